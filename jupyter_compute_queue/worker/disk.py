"""What a run writes to the worker's disk while it runs, and the caps on it (SPEC §6).

Docker's own per-container disk quota (``storage-opt size``) needs overlay2 on XFS with project
quotas, which few machines have, so the worker measures instead: a run may fill the disk in
four places, and :class:`DiskMeter` samples each of them.

* ``/outputs`` (the run folder's ``outputs/``): walked at every sample;
* ``/inputs`` (``inputs/``): its growth since the run started, walked at every sample;
* the container's writable layer (``/tmp`` and every other path outside the mounts): the
  engine's ``SizeRw``, which walks the layer (about 2 ms for an empty layer, 85 ms for 20,000
  files): only at the slower pace of ``RunnerConfig.disk_poll_seconds`` (5 s), and once more
  when the container has exited;
* the queue's ``/job-cache``: its growth since the run started, also at the slower pace (a
  cache may hold many files). Runs of one queue on one worker share it, so while several run
  at once each is counted what all of them added: approximate, and on the side of stopping.

Sizes are apparent sizes (``st_size``; the engine counts its layer the same way): a sparse file
counts in full, and a file's blocks and inodes beyond its bytes do not count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .prepare import RunFolder, tree_size

__all__ = ["DiskMeter", "DiskUse", "over_caps"]


@dataclass(frozen=True)
class DiskUse:
    """Bytes a run has written to the worker's disk, by where they went."""

    outputs: int
    #: What ``/inputs`` grew by since the run started.
    inputs: int
    #: The container's writable layer: ``/tmp`` and the rest of its own file system.
    layer: int
    #: What the queue's ``/job-cache`` grew by since the run started.
    job_cache: int

    @property
    def total(self) -> int:
        return self.outputs + self.inputs + self.layer + self.job_cache

    def where(self) -> str:
        """The places that hold something, largest first, e.g. ``"8388608 in the container's
        own files (/tmp and every path outside the mounts), 4096 more in /inputs"``."""
        parts = [
            (self.layer, "in the container's own files (/tmp and every path outside the mounts)"),
            (self.inputs, "more in /inputs"),
            (self.job_cache, "more in the queue's /job-cache"),
            (self.outputs, "in /outputs"),
        ]
        held = sorted((part for part in parts if part[0] > 0), key=lambda part: -part[0])
        return ", ".join(f"{size} {place}" for size, place in held) or "nothing"


def over_caps(use: DiskUse, max_output_bytes: int, max_disk_bytes: int) -> str | None:
    """Why a run must end (its ``Error`` message), or None while it is within both caps."""
    if use.outputs > max_output_bytes:
        return f"/outputs grew past the cap of {max_output_bytes} bytes ({use.outputs})"
    if use.total > max_disk_bytes:
        return (
            f"wrote {use.total} bytes to the worker's disk, past the worker's cap of"
            f" {max_disk_bytes} bytes per run: {use.where()}"
        )
    return None


class DiskMeter:
    """Samples what one run wrote. Its methods block (they walk folders): call them in a
    thread. Create it before the container starts: the sizes then are the baselines."""

    def __init__(
        self, folder: RunFolder, job_cache: Path, layer_size: Callable[[], int | None]
    ) -> None:
        """``layer_size`` gives the container's ``SizeRw``, or None when the engine cannot say
        (the last known size is kept)."""
        self.folder = folder
        self.job_cache = job_cache
        self.layer_size = layer_size
        self._inputs_at_start = tree_size(folder.inputs)
        self._cache_at_start = tree_size(job_cache)
        self._layer = 0
        self._cache_growth = 0

    def sample(self, *, slow: bool) -> DiskUse:
        """The run's use now; the layer and the job cache are measured again only if ``slow``
        (else their last sizes stand)."""
        if slow:
            layer = self.layer_size()
            if layer is not None:
                self._layer = layer
            # A job that deletes what was there before it frees space: not a credit to spend.
            self._cache_growth = max(0, tree_size(self.job_cache) - self._cache_at_start)
        return DiskUse(
            outputs=tree_size(self.folder.outputs),
            inputs=max(0, tree_size(self.folder.inputs) - self._inputs_at_start),
            layer=self._layer,
            job_cache=self._cache_growth,
        )
