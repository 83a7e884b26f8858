"""Runs: states, phases and reasons (SPEC §4) and the run record the API returns."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone
from enum import Enum
from typing import Any, TypeVar

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

    def changed(self, **update: Any) -> RunRecord:
        """A copy with these fields changed: ``model_copy(update=…)`` at a fraction of its cost."""
        return trusted(
            RunRecord, {**self.__dict__, **update}, self.model_fields_set | update.keys()
        )


M = TypeVar("M", bound=BaseModel)


def trusted(cls: type[M], fields: dict[str, Any], fields_set: Iterable[str] | None = None) -> M:
    """A model from values of the right types that the host made itself (a store row, another
    record), without validation: the hot path builds several records per run, and validating
    them was a measurable share of the host's time (benchmarks/RESULTS.md); pydantic's own
    ``model_construct`` is slower still. ``fields`` holds every field; ``fields_set`` (what a
    validated model would count as given) defaults to all of them."""
    model = cls.__new__(cls)
    _set = object.__setattr__
    _set(model, "__dict__", fields)
    _set(model, "__pydantic_fields_set__", set(fields if fields_set is None else fields_set))
    _set(model, "__pydantic_extra__", None)
    _set(model, "__pydantic_private__", None)
    return model


#: The fields a record built from a store row sets (all but ``cached``, left at its default).
ROW_FIELDS = frozenset(RunRecord.model_fields) - {"cached"}


def utc(epoch: float | None) -> datetime | None:
    """An aware UTC datetime from epoch seconds (None stays None)."""
    return None if epoch is None else datetime.fromtimestamp(epoch, tz=timezone.utc)
