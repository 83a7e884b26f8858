"""The seam between the agent and what runs a run: the ``Runtime`` protocol and what crosses it.

The agent hands a runtime a :class:`Run` with two callbacks (phases, log text) and gets a
:class:`RunResult` back; it knows nothing else about how the run is carried out.
:class:`~.docker_runner.DockerRunner` runs each run as a container (the default, and the only
runtime for real jobs); :class:`~.noop_runner.NoopRunner` finishes runs at once without a
container, to measure the queue itself (``benchmarks/``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..model.jobs import JobDefinition
from ..model.runs import OutputRef, Phase, Reason
from .resources import Allocation


@dataclass
class Run:
    """What the agent hands the runtime."""

    run_id: str
    job_id: str
    queue: str
    fence: int
    definition: JobDefinition
    blobs: dict[str, str]
    job_url: str
    allocation: Allocation


@dataclass
class RunResult:
    """How the run ended, as the agent reports it to the host."""

    reason: Reason
    exit_code: int | None = None
    message: str | None = None
    outputs: dict[str, OutputRef] = field(default_factory=dict)
    image_digest: str | None = None


class RuntimeLost(Exception):
    """What carries runs out went away in the middle of one (the Docker engine stopped or
    restarted): no result. The agent gives the run back to the host counted as lost (as when a
    worker dies: the job may be what brought the engine down) and takes no more runs until
    :meth:`Runtime.recovered` returns."""


Phases = Callable[[Phase, str | None], None]  # (phase, image digest)
Logs = Callable[[str, str], None]  # (stream, text)


class Runtime(Protocol):
    """Runs the runs of one worker."""

    async def run(self, run: Run, phase: Phases, log: Logs) -> RunResult:
        """Carry the run out to its end; the job's own failures are results, never raised."""

    async def stop(self, run_id: str, why: str = "cancelled") -> None:
        """Stop a run (cancelled, lease lost, shutting down); its ``run`` then returns."""

    async def remove_leftovers(self, keep: set[str]) -> list[str]:
        """Clean up what earlier runs of this worker left, except the runs in ``keep``; the ids
        of the runs cleaned up."""

    async def recovered(self) -> None:
        """Return once runs can be carried out again, after a ``run`` raised RuntimeLost."""

    async def close(self) -> None:
        """Wait for the clean-up of finished runs (the worker is about to end)."""
