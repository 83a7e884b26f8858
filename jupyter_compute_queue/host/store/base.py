"""The durable state of a queue host behind one async interface.

The store keeps jobs, runs, holders (namespaces), worker leases and blob references, and applies
the state changes of SPEC §3 to §5 atomically. It holds no policy: the service decides who may do
what and which queues a cache lookup may see, and tells the store.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from ...model.capacity import Capacity
from ...model.jobs import JobDefinition
from ...model.runs import OutputRef, Phase, Reason, RunRecord, RunState


class StoreError(Exception):
    """Base of the store's own errors."""


class Conflict(StoreError):
    """An update that does not match the run's current state (a stale fence, a wrong worker)."""


class NotFound(StoreError, KeyError):
    """No such job, run or worker."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


@dataclass(frozen=True, slots=True)
class SubmitRequest:
    """One submission, already validated and authorised by the service."""

    queue: str
    definition: JobDefinition
    job_id: str
    namespace: str
    rerun: bool = False
    #: Whether Success runs of other queues may answer it (``cache_scope = "host"``); the
    #: service sets it only where no queue's results can leak to callers who may not see them.
    cache_any_queue: bool = False
    #: Only runs finished after this epoch time count as cached results (retention).
    cache_since: float = 0.0
    #: URLs to call: ``{"queued": url, "finished": url}`` (either may be absent), checked by
    #: the service; kept in the same transaction as the submission.
    callbacks: dict[str, str] = field(default_factory=dict)
    #: The stored form of the definition (JSON of its ``wire()``), when the service made it
    #: already; else the store makes it.
    stored: str | None = None


@dataclass(frozen=True, slots=True)
class Change:
    """A run whose state changed, and whether the change was new (False for a duplicate)."""

    record: RunRecord
    changed: bool
    #: The worker that was running it, when the change means that worker must stop it.
    stop_on_worker: str | None = None


@dataclass(frozen=True, slots=True)
class SubmitResult:
    """What a submission did: the run it answers with, and the runs its namespace let go of."""

    record: RunRecord
    #: "new" (a run was queued), "joined" (an unfinished run got a holder), or "cached".
    outcome: str
    #: Runs that lost this namespace as a holder; those left with none finished ``Replaced``.
    released: list[Change] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What a worker says of itself when it registers."""

    worker_id: str
    queues: tuple[str, ...]
    capacity: Capacity
    version: str | None = None
    tags: frozenset[str] = frozenset()
    max_duration: int = 3600  # seconds; it may run jobs whose limit is at most this


@dataclass(frozen=True, slots=True)
class Held:
    """A run a worker holds, with the fence of its assignment."""

    run_id: str
    fence: int


@dataclass(frozen=True, slots=True)
class Assignment:
    """A run given to a worker: the record, the stored definition and the fence."""

    record: RunRecord
    definition: dict[str, Any]
    fence: int
    #: What the run takes from the worker's free capacity.
    needs: Capacity


@dataclass(frozen=True, slots=True)
class Registration:
    """The result of (re-)registering a worker."""

    #: Runs this worker holds under its fences and may keep running.
    kept: list[Held]
    #: Runs it held on the host's side but did not report: requeued (or finished WorkerLost).
    lost: list[RunRecord]


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a worker says a run ended."""

    reason: Reason
    exit_code: int | None = None
    message: str | None = None
    outputs: dict[str, OutputRef] = field(default_factory=dict)
    log_bytes: int = 0
    image_digest: str | None = None


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing, newest first; ``cursor`` fetches the next page (None at the end)."""

    runs: list[RunRecord]
    cursor: str | None


@dataclass(frozen=True, slots=True)
class QueueCounts:
    """Runs of a queue by state, and when its oldest queued run was queued (epoch seconds)."""

    by_state: dict[RunState, int]
    oldest_queued_at: float | None


@dataclass(frozen=True, slots=True)
class DueCallback:
    """A callback to send now: its id in the store, event, URL, JSON body and past attempts."""

    id: int
    event: str
    url: str
    payload: dict[str, Any]
    attempts: int


@dataclass(frozen=True, slots=True)
class Swept:
    """What a retention sweep removed."""

    run_ids: list[str]
    jobs: int


class Store(ABC):
    """Durable state; every method is atomic."""

    @abstractmethod
    async def open(self) -> None:
        """Create or migrate the schema and get ready."""

    @abstractmethod
    async def close(self) -> None:
        """Finish pending writes and release resources."""

    # --- jobs and submissions -------------------------------------------------------------

    @abstractmethod
    async def submit(self, requests: Sequence[SubmitRequest], now: float) -> list[SubmitResult]:
        """Join, answer from cache or queue each request, in order (SPEC §3)."""

    @abstractmethod
    async def get_definition(self, job_id: str) -> dict[str, Any] | None:
        """The stored (wire) definition of a job."""

    @abstractmethod
    async def job_runs(self, job_id: str, queues: Collection[str] | None = None) -> list[RunRecord]:
        """A job's runs, newest first, limited to ``queues`` when given."""

    @abstractmethod
    async def get_run(self, run_id: str) -> RunRecord | None:
        """One run."""

    @abstractmethod
    async def list_runs(
        self,
        queue: str,
        *,
        states: Collection[RunState] = (),
        namespace: str | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> Page:
        """A queue's runs, newest first, keyset-paginated."""

    @abstractmethod
    async def active_runs(self) -> list[RunRecord]:
        """Runs that are queued or running, in every queue."""

    @abstractmethod
    async def counts(self, queue: str) -> QueueCounts:
        """Runs of a queue by state."""

    @abstractmethod
    async def cancel(self, queue: str, job_id: str, namespace: str | None, now: float) -> Change:
        """Cancel the job's unfinished run in the queue, or drop one holder (SPEC §3).

        Without an unfinished run, answers the latest run unchanged; NotFound without any.
        """

    @abstractmethod
    async def forget(self, queue: str, job_id: str) -> int:
        """Stop the job's Success runs in the queue from answering as cached; how many."""

    @abstractmethod
    async def touch(self, run_ids: Collection[str], now: float) -> None:
        """Record an access to these runs (retention counts from the last access)."""

    # --- workers, leases, results ---------------------------------------------------------

    @abstractmethod
    async def register_worker(
        self,
        worker: WorkerInfo,
        held: Sequence[Held],
        now: float,
        lease_seconds: float,
        max_lost: int,
    ) -> Registration:
        """(Re-)register a worker with a fresh lease; requeue what it no longer holds."""

    @abstractmethod
    async def heartbeat(self, worker_id: str, now: float, lease_seconds: float) -> list[Held]:
        """Renew a worker's lease; the runs it still holds. NotFound if never registered."""

    @abstractmethod
    async def claim(self, worker: WorkerInfo, free: Capacity, now: float) -> Assignment | None:
        """Assign the oldest queued run that fits, marking it Running under a new fence."""

    @abstractmethod
    async def claim_many(
        self, worker: WorkerInfo, free: Capacity, now: float, limit: int
    ) -> list[Assignment]:
        """Claim, oldest first, up to ``limit`` runs that fit together in ``free``, in one
        transaction. Fewer than ``limit`` means nothing else fits."""

    @abstractmethod
    def set_phase_later(
        self, run_id: str, fence: int, worker_id: str, phase: Phase, image_digest: str | None
    ) -> asyncio.Future[None]:
        """Queue the phase of a run running under this fence with the next write, without
        waiting for it (a run that has moved on since is left alone)."""

    @abstractmethod
    async def set_phase(
        self, run_id: str, fence: int, worker_id: str, phase: Phase, image_digest: str | None
    ) -> RunRecord:
        """Record a running run's phase. Conflict unless the run is running under this fence."""

    @abstractmethod
    async def finish(
        self, run_id: str, fence: int, worker_id: str, outcome: Outcome, now: float
    ) -> Change:
        """Accept a worker's result. Conflict on a stale fence; a duplicate changes nothing."""

    @abstractmethod
    async def give_back(
        self,
        worker_id: str,
        run_ids: Collection[str] | None,
        *,
        now: float | None = None,
        max_lost: int | None = None,
    ) -> list[RunRecord]:
        """Requeue runs a worker hands back (all of them for None): uncounted (a graceful
        give-back), unless ``max_lost`` is given: then each counts as a loss at ``now``, as
        when a lease expires (requeued, or finished WorkerLost at the ``max_lost``-th)."""

    @abstractmethod
    async def drop_worker(self, worker_id: str) -> None:
        """Forget a worker that said goodbye (it holds nothing any more)."""

    @abstractmethod
    async def expire_leases(self, now: float, max_lost: int) -> list[RunRecord]:
        """Requeue (or finish WorkerLost) the runs of workers whose lease has passed."""

    @abstractmethod
    async def extend_leases(self, now: float, lease_seconds: float) -> None:
        """Give every worker a fresh lease (after the host itself was down)."""

    @abstractmethod
    async def workers(self, queue: str | None = None) -> list[dict[str, Any]]:
        """Registered workers (of a queue), with capacity, lease and running runs
        (``running``: ``[{"runId", "queue"}]``)."""

    # --- retention ------------------------------------------------------------------------

    @abstractmethod
    async def sweep(self, cutoff: float, batch: int) -> Swept:
        """Delete up to ``batch`` finished runs last accessed before ``cutoff``, and jobs left
        with no runs that were last accessed before it."""

    @abstractmethod
    async def referenced_blobs(self, keys: Collection[str]) -> set[str]:
        """Which of these blob keys a stored job or run refers to."""

    # --- callbacks (SPEC §11) -------------------------------------------------------------
    # A submission's callbacks are stored by ``submit``; a ``finished`` one becomes due in the
    # same transaction that finishes its run.

    @abstractmethod
    async def due_callbacks(self, now: float, limit: int) -> list[DueCallback]:
        """Up to ``limit`` callbacks due at ``now``, the longest due first."""

    @abstractmethod
    async def callbacks_waiting(self) -> bool:
        """Whether any ``finished`` callback waits for its run to finish."""

    @abstractmethod
    async def next_callback_at(self) -> float | None:
        """When the next callback is due (None: none is, whatever waits for a run)."""

    @abstractmethod
    async def callbacks_done(self, ids: Collection[int]) -> None:
        """Forget callbacks that were sent (or given up)."""

    @abstractmethod
    async def callback_retry(self, callback_id: int, due_at: float) -> None:
        """Count a failed attempt and make the callback due again at ``due_at``."""
