"""Runs: states, phases and reasons (SPEC §4) and the run record the API returns."""

from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

#: The namespace of submissions that name none.
DEFAULT_NAMESPACE = "_"


class RunState(str, Enum):
    """Where a run is in its life."""

    QUEUED = "Queued"  # waiting for a worker (also after a lost lease or a give-back)
    RUNNING = "Running"  # assigned to a worker under a lease; see its phase
    FINISHED = "Finished"  # done for good; see its reason


class Phase(str, Enum):
    """What a running run is doing on its worker."""

    PULLING = "pulling"  # fetching the image
    BUILDING = "building"  # building the image from the job's build spec
    PREPARING = "preparing"  # writing and fetching inputs
    RUNNING = "running"  # the container is running
    UPLOADING = "uploading"  # storing outputs


class Reason(str, Enum):
    """Why a run finished."""

    SUCCESS = "Success"  # exit 0 and the outputs stored; becomes the cached result
    FAILED = "Failed"  # the container exited non-zero
    ERROR = "Error"  # the system failed (pull, build, inputs, upload, output cap)
    TIMED_OUT = "TimedOut"  # ran past its max duration
    CANCELLED = "Cancelled"  # cancelled by a person, or its last holder let go
    REPLACED = "Replaced"  # its namespace submitted another job
    WORKER_LOST = "WorkerLost"  # its lease expired max_lost times


class _Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class WorkerRef(_Wire):
    """Which worker ran (or runs) a run."""

    id: str
    version: str | None = None


class OutputRef(_Wire):
    """One output file: its blob and size."""

    key: str
    size: int


class RunRecord(_Wire):
    """What the API returns for a run (SPEC §4)."""

    run_id: str
    job_id: str
    queue: str
    state: RunState
    phase: Phase | None = None
    reason: Reason | None = None
    exit_code: int | None = None
    message: str | None = None
    namespaces: list[str] = Field(default_factory=list)
    attempt: int = 0
    lost_count: int = 0
    worker: WorkerRef | None = None
    image_digest: str | None = None
    cached: bool = False
    outputs: dict[str, OutputRef] = Field(default_factory=dict)
    log_bytes: int = 0
    queued_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def finished(self) -> bool:
        return self.state is RunState.FINISHED

    def wire(self) -> dict[str, object]:
        """The JSON form: camelCase, times as ISO 8601 UTC."""
        return self.model_dump(mode="json", by_alias=True)


def utc(epoch: float | None) -> datetime | None:
    """An aware UTC datetime from epoch seconds (None stays None)."""
    return None if epoch is None else datetime.fromtimestamp(epoch, tz=timezone.utc)
