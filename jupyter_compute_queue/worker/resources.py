"""What a worker has (cpus, memory, GPU indices) and what its runs hold (SPEC §5, §6).

The worker reports its free capacity to the host, and the host assigns only runs that fit it, so
an allocation that does not fit means the two sides disagree; it is refused rather than
over-committing a GPU. GPU indices are host device numbers handed to Docker in a device request;
inside the container they are renumbered from 0 (``CUDA_VISIBLE_DEVICES=0..n-1``).

Everything here is synchronous and does no I/O except ``parse_gpus("all")``, which runs
``nvidia-smi -L`` once at start-up. ``Resources`` is called from the worker's event loop: each
method runs to completion without awaiting, so interleaved asyncio tasks always see it whole.
"""

from __future__ import annotations

import math
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..model.capacity import DEFAULT_CPUS, Capacity

if TYPE_CHECKING:
    # docker-py ships no type hints; with types-docker installed the ignore is simply unused.
    from docker.types import DeviceRequest  # type: ignore[import-untyped, unused-ignore]

__all__ = [
    "Allocation",
    "ResourceError",
    "Resources",
    "cuda_visible_devices",
    "docker_device_request",
    "gpu_device_request",
    "parse_gpus",
]

_GPU_SPEC_HELP = "use a count like '2', 'all' (every GPU nvidia-smi lists) or 'device=1,3'"
#: A line of ``nvidia-smi -L``: "GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-...)". MIG instances
#: are listed indented under their GPU ("  MIG 1g.5gb Device 0: ..."); they are not Docker
#: device indices, so the pattern is anchored at the start of the line to skip them.
_NVIDIA_SMI_GPU = re.compile(r"^GPU (\d+):", re.MULTILINE)
_INDEX = re.compile(r"^\d+$")
#: Long enough for a driver that is slow to wake up, short enough not to hang start-up.
NVIDIA_SMI_TIMEOUT = 30.0


class ResourceError(ValueError):
    """A resource spec or request that cannot be honoured; the message says what is accepted."""


def parse_gpus(
    spec: str | int | None,
    nvidia_smi: str = "nvidia-smi",
    *,
    timeout: float = NVIDIA_SMI_TIMEOUT,
) -> tuple[int, ...]:
    """The GPU indices a worker offers, from its ``--gpus`` option, sorted and distinct.

    ``None``, ``0`` or ``"0"``: none. ``N`` or ``"N"``: ``0..N-1``. ``"all"``: every GPU that
    ``nvidia-smi -L`` lists (``nvidia_smi`` is the program to run). ``"device=1,3"``: those
    indices. Raises ``ResourceError`` naming the spec, or saying why ``nvidia-smi`` gave no list.
    """
    if spec is None:
        return ()
    # bool is an int subclass; True is far more likely a mistake than "one GPU".
    if isinstance(spec, bool) or not isinstance(spec, (int, str)):
        raise ResourceError(f"--gpus {spec!r} is not a GPU spec: {_GPU_SPEC_HELP}")
    if isinstance(spec, int):
        if spec < 0:
            raise ResourceError(f"--gpus {spec!r} is not a GPU spec: {_GPU_SPEC_HELP}")
        return tuple(range(spec))
    text = spec.strip()
    if _INDEX.match(text):
        return tuple(range(int(text)))
    if text.lower() == "all":
        return _list_gpus(nvidia_smi, timeout)
    if text.lower().startswith("device="):
        parts = [part.strip() for part in text[len("device=") :].split(",")]
        if parts and all(_INDEX.match(part) for part in parts):
            return tuple(sorted({int(part) for part in parts}))
        raise ResourceError(
            f"--gpus {spec!r} is not a GPU spec: 'device=' takes non-negative GPU indices"
            " separated by commas, like 'device=1,3'"
        )
    raise ResourceError(f"--gpus {spec!r} is not a GPU spec: {_GPU_SPEC_HELP}")


def _list_gpus(nvidia_smi: str, timeout: float) -> tuple[int, ...]:
    """The indices ``nvidia-smi -L`` lists; a ResourceError when it cannot say."""
    hint = "install the NVIDIA driver, or name the GPUs with --gpus device=0,1"
    try:
        done = subprocess.run(
            [nvidia_smi, "-L"],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise ResourceError(
            f"--gpus all counts GPUs with {nvidia_smi!r}, which was not found: {hint}"
        ) from None
    except subprocess.TimeoutExpired:
        raise ResourceError(
            f"--gpus all counts GPUs with '{nvidia_smi} -L', which did not answer within"
            f" {timeout:g} s: {hint}"
        ) from None
    except OSError as exc:
        raise ResourceError(
            f"--gpus all counts GPUs with {nvidia_smi!r}, which could not be run ({exc}): {hint}"
        ) from None
    if done.returncode != 0:
        # nvidia-smi prints its failure ("couldn't communicate with the NVIDIA driver") on
        # stdout, so both streams are quoted, shortened.
        said = " ".join((done.stderr.strip() + " " + done.stdout.strip()).split())[:300]
        raise ResourceError(
            f"--gpus all counts GPUs with '{nvidia_smi} -L', which failed with exit code"
            f" {done.returncode}" + (f" ({said})" if said else "") + f": {hint}"
        )
    indices = tuple(sorted({int(i) for i in _NVIDIA_SMI_GPU.findall(done.stdout)}))
    if not indices:
        # Asking for every GPU and getting none is a misconfigured host, not a CPU worker.
        raise ResourceError(f"--gpus all: '{nvidia_smi} -L' lists no GPUs: {hint}")
    return indices


def _check_indices(indices: Sequence[int]) -> list[int]:
    """The indices as a list, refusing what Docker would not take as a device index."""
    out = list(indices)
    if not out:
        # An empty nvidia request does not mean "no GPU" to every runtime; send none at all.
        raise ResourceError("a device request needs at least one GPU index; a CPU run needs none")
    for index in out:
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ResourceError(f"{index!r} is not a GPU index: use non-negative integers")
    return out


def gpu_device_request(indices: Sequence[int]) -> dict[str, object]:
    """The Docker API ``DeviceRequest`` giving a container the GPUs ``indices`` (SPEC §6).

    ``{"Driver": "nvidia", "DeviceIDs": ["1", "3"], "Capabilities": [["gpu"]]}``: device ids
    are strings in the API; ``[["gpu"]]`` asks the nvidia runtime for compute access.
    """
    ids = [str(index) for index in _check_indices(indices)]
    return {"Driver": "nvidia", "DeviceIDs": ids, "Capabilities": [["gpu"]]}


def docker_device_request(indices: Sequence[int]) -> DeviceRequest:
    """``gpu_device_request(indices)`` as a ``docker.types.DeviceRequest`` for docker-py.

    docker-py adds its defaults (``"Count": 0``, ``"Options": {}``), which ask for nothing more.
    """
    # Imported here so the resource accounting (and its tests) need no Docker SDK.
    from docker.types import DeviceRequest  # type: ignore[import-untyped, unused-ignore]

    ids = [str(index) for index in _check_indices(indices)]
    # The same fields as gpu_device_request, which the tests hold the two to.
    return DeviceRequest(driver="nvidia", device_ids=ids, capabilities=[["gpu"]])


def cuda_visible_devices(n: int) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a container given ``n`` GPUs: ``"0,1,…,n-1"`` (``""`` for 0).

    The container sees only its own devices, renumbered from 0, so the value never names the
    host indices.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ResourceError(f"{n!r} is not a GPU count: use a non-negative integer")
    return ",".join(str(i) for i in range(n))


@dataclass(frozen=True, slots=True)
class Allocation:
    """What one run holds on the worker while it runs."""

    run_id: str
    cpus: float
    memory: int  # bytes; 0 when the run asked for none
    gpus: tuple[int, ...]  # host GPU indices, ascending


class Resources:
    """A worker's capacity and the runs holding parts of it.

    ``memory=None`` means the worker does not account memory (as in ``Capacity``): runs may
    still name a memory limit, which is recorded but never refused.
    """

    def __init__(self, cpus: float, memory: int | None, gpus: Sequence[int]) -> None:
        """A worker with ``cpus`` cores, ``memory`` bytes (or unaccounted) and these GPUs."""
        if (
            isinstance(cpus, bool)
            or not isinstance(cpus, (int, float))
            or not (math.isfinite(cpus) and cpus > 0)
        ):
            raise ResourceError(f"cpus {cpus!r} is not a capacity: use a positive number")
        if memory is not None and (
            isinstance(memory, bool) or not isinstance(memory, int) or memory < 0
        ):
            raise ResourceError(
                f"memory {memory!r} is not a capacity: use bytes (an integer >= 0) or None"
            )
        indices = list(gpus)
        for index in indices:
            if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                raise ResourceError(f"{index!r} is not a GPU index: use non-negative integers")
        if len(set(indices)) != len(indices):
            raise ResourceError(f"GPU indices {indices!r} repeat an index: list each GPU once")
        self._cpus = float(cpus)
        self._memory = memory
        self._gpus = tuple(sorted(indices))
        self._held: dict[str, Allocation] = {}
        # Kept in step with _held so finding free GPUs does not walk every allocation.
        self._gpu_owner: dict[int, str] = {}

    @property
    def total(self) -> Capacity:
        """Everything the worker offers, as it registers it with the host."""
        return Capacity(self._cpus, self._memory, len(self._gpus))

    @property
    def free(self) -> Capacity:
        """What is not held by a run, as the worker reports it when asking for work."""
        # Summed afresh rather than kept as a running balance: repeated float additions and
        # subtractions would drift, and an idle worker must report exactly its total.
        cpus = self._cpus - math.fsum(a.cpus for a in self._held.values())
        memory = None
        if self._memory is not None:
            memory = self._memory - sum(a.memory for a in self._held.values())
        return Capacity(max(cpus, 0.0), memory, len(self._gpus) - len(self._gpu_owner))

    @property
    def gpu_indices(self) -> tuple[int, ...]:
        """All the worker's GPU indices, ascending."""
        return self._gpus

    @property
    def free_gpus(self) -> tuple[int, ...]:
        """The GPU indices no run holds, ascending."""
        return tuple(i for i in self._gpus if i not in self._gpu_owner)

    def allocate(
        self, run_id: str, cpus: float | None, memory: int | None, gpus: int
    ) -> Allocation:
        """Take what run ``run_id`` needs: ``cpus`` (default 1), ``memory`` bytes (default 0)
        and the ``gpus`` lowest free GPU indices.

        The defaults are the ones the host schedules with, so both sides count a run alike.
        Raises ``ResourceError`` (taking nothing) if the run already holds resources, the request
        is malformed, or it does not fit what is free.
        """
        if run_id in self._held:
            raise ResourceError(
                f"run {run_id!r} already holds resources on this worker: release it first"
            )
        need_cpus = DEFAULT_CPUS if cpus is None else cpus
        if (
            isinstance(need_cpus, bool)
            or not isinstance(need_cpus, (int, float))
            or not (math.isfinite(need_cpus) and need_cpus >= 0)
        ):
            raise ResourceError(f"run {run_id!r}: cpus {cpus!r} is not a number >= 0")
        need_memory = 0 if memory is None else memory
        if isinstance(need_memory, bool) or not isinstance(need_memory, int) or need_memory < 0:
            raise ResourceError(f"run {run_id!r}: memory {memory!r} is not bytes >= 0")
        if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
            raise ResourceError(f"run {run_id!r}: gpus {gpus!r} is not a count >= 0")
        free = self.free
        if not free.fits(need_cpus, need_memory, gpus):
            raise ResourceError(
                f"run {run_id!r} needs cpus={need_cpus:g}, memory={need_memory}, gpus={gpus}"
                f" but this worker has free cpus={free.cpus:g}, memory={free.memory},"
                f" gpus={free.gpus}; the host assigns only runs that fit the free capacity the"
                " worker reports, so the two disagree"
            )
        # All checks are done before anything changes, so a refusal leaves no partial hold.
        taken = self.free_gpus[:gpus]
        allocation = Allocation(run_id, float(need_cpus), need_memory, taken)
        self._held[run_id] = allocation
        for index in taken:
            self._gpu_owner[index] = run_id
        return allocation

    def release(self, run_id: str) -> None:
        """Give back what run ``run_id`` holds; nothing happens if it holds nothing.

        Idempotent because a run may end along several paths (exit, cancel, lease loss) that
        each release it.
        """
        allocation = self._held.pop(run_id, None)
        if allocation is None:
            return
        for index in allocation.gpus:
            # Only drop the index if this run owns it: a stale owner map must never free a
            # GPU another run holds.
            if self._gpu_owner.get(index) == run_id:
                del self._gpu_owner[index]

    def held(self) -> dict[str, Allocation]:
        """The allocations by run id (a copy: changing it changes nothing here)."""
        return dict(self._held)

    def __repr__(self) -> str:
        return f"Resources(total={self.total!r}, free={self.free!r}, held={len(self._held)})"
