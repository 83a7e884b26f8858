"""What a worker has and what a run takes of it, as host and worker both count it."""

from __future__ import annotations

from dataclasses import dataclass

#: A run that names no cpus counts as one when fitting it into a worker's free capacity.
DEFAULT_CPUS = 1.0


@dataclass(frozen=True, slots=True)
class Capacity:
    """Resources of a worker: total when it registers, free when it asks for work."""

    cpus: float
    memory: int | None = None  # bytes; None: the worker does not account memory
    gpus: int = 0

    def fits(self, cpus: float, memory: int, gpus: int) -> bool:
        """True when a run needing these resources fits in this capacity."""
        mem_ok = self.memory is None or memory <= self.memory
        return cpus <= self.cpus + 1e-9 and mem_ok and gpus <= self.gpus

    def minus(self, used: Capacity) -> Capacity:
        """What is left after ``used`` is taken (memory stays unaccounted if it was)."""
        memory = None if self.memory is None else self.memory - (used.memory or 0)
        return Capacity(self.cpus - used.cpus, memory, self.gpus - used.gpus)
