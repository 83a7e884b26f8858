"""The queue service: the rules of SPEC §3 to §5 on top of the store, the logs and the blobs.

Front ends (REST, websockets) call it with an :class:`Identity`; it checks the access policy,
validates, lets the store apply the change atomically, then publishes events and pushes work to
connected workers. It knows nothing of HTTP.

Here are its lifecycle, the access checks, reading, cancelling and forgetting, the announcement
of changed runs and retention. It inherits its submission side (:mod:`.submissions`) and its
worker side (:mod:`.dispatch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from ..model.runs import RunRecord, RunState
from . import metrics
from .access import ANONYMOUS, AccessPolicy, Action, Identity, check_namespace, check_queue_name
from .blobs import BlobNotFound, BlobStore
from .callbacks import CallbackSender
from .dispatch import Lease, WorkerSession, WorkerSide
from .events import EventBus, RunChanged
from .logs import LogStore
from .metrics import QueueStats
from .secrets import SecretBox
from .service_base import DAY, BadRequest, Forbidden, ServiceConfig, ServiceError, TooLarge
from .store.base import Change, NotFound, Page, Store
from .submissions import Submissions

# The service's public names, wherever they live.
__all__ = [
    "BadRequest",
    "Forbidden",
    "QueueService",
    "ServiceConfig",
    "ServiceError",
    "TooLarge",
    "WorkerSession",
]

log = logging.getLogger(__name__)


class QueueService(WorkerSide, Submissions):
    """The host's rules; one per server process."""

    def __init__(
        self,
        store: Store,
        logs: LogStore,
        blobs: BlobStore,
        config: ServiceConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.logs = logs
        self.blobs = blobs
        self.config = config or ServiceConfig()
        self.policy = AccessPolicy(public=self.config.public)
        self.bus = EventBus()
        self.clock = clock
        self._sessions: dict[str, WorkerSession] = {}
        self._fences: dict[str, Lease] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._touched: dict[str, float] = {}  # run id → when this process last recorded a read
        #: Live counts: unfinished runs (for the idle culler) and the metrics.
        self.stats = QueueStats(clock)
        self.callbacks = CallbackSender(store, self.config, clock)
        #: Secret values of unfinished runs, in memory only (docs/design.md, "Secrets").
        self.secrets = SecretBox()
        self.stopped = False  # set by stop(): sockets closing after it leave the store alone

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the sweepers, the callback sender and the metrics. Workers get a fresh lease:
        the host's own downtime is not theirs."""
        await self.store.extend_leases(self.clock(), self.config.lease_seconds)
        self.stats.load(await self.store.active_runs())
        self._tasks = [
            asyncio.create_task(self._every(self.config.lease_seconds / 6, self.expire_leases)),
            asyncio.create_task(self._every(self.config.retention_interval, self.sweep)),
        ]
        self.callbacks.start()
        metrics.track(self)

    async def stop(self) -> None:
        """Stop the sweepers and the callback sender (the caller closes the store, logs and
        blobs)."""
        self.stopped = True
        metrics.untrack(self)
        await self.callbacks.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _every(self, seconds: float, job: Callable[[], Awaitable[Any]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except Exception:  # a sweeper must outlive one bad round; the log says why
                log.exception("compute-queue: %s failed", getattr(job, "__name__", job))

    # --- access -----------------------------------------------------------------------------

    def check(self, identity: Identity, action: Action, queue: str | None) -> None:
        """Raise Forbidden unless the policy allows it."""
        if queue is not None:
            try:
                check_queue_name(queue)
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
        if not self.policy.allowed(identity, action, queue):
            where = f" on queue {queue!r}" if queue else ""
            raise Forbidden(f"{_who(identity)} may not {action.value}{where}")

    def _check_lookup(self, identity: Identity, action: Action, queue: str | None) -> None:
        """A lookup in one queue needs that queue; a global one needs some visible queue."""
        if queue is not None:
            self.check(identity, action, queue)
        elif not self.policy.may_read_some_queue(identity):
            raise Forbidden(f"{_who(identity)} may not {action.value} jobs on this host")

    def visible(self, identity: Identity, queue: str) -> bool:
        """Whether the caller may see a queue's runs."""
        return self.policy.allowed(identity, Action.READ, queue)

    # --- reading ----------------------------------------------------------------------------

    async def get_job(
        self, identity: Identity, job: str, queue: str | None = None
    ) -> dict[str, Any]:
        """``{"jobId", "definition", "runs"}`` with the runs of the queues the caller may see."""
        self._check_lookup(identity, Action.READ, queue)
        runs = await self.store.job_runs(job, None if queue is None else [queue])
        runs = [r for r in runs if self.visible(identity, r.queue)]
        if not runs:
            raise NotFound(f"job {job} is not known" + (f" in queue {queue!r}" if queue else ""))
        await self._touch(runs)
        definition = await self.store.get_definition(job)
        return {
            "jobId": job,
            "definition": definition,
            "runs": [self.with_live_log_bytes(r).wire() for r in runs],
        }

    async def latest_run(self, identity: Identity, job: str, queue: str | None) -> RunRecord:
        """The newest run of a job the caller may see (in ``queue`` when given)."""
        data = await self.get_job(identity, job, queue)
        return RunRecord.model_validate(data["runs"][0])

    async def _touch(self, runs: Sequence[RunRecord]) -> None:
        """Retention counts from the last access; an hour's precision saves a write per read."""
        now = self.clock()
        stale = [r.run_id for r in runs if now - self._touched.get(r.run_id, 0.0) > 3600]
        if stale:
            await self.store.touch(stale, now)
            if len(self._touched) > 100_000:
                self._touched.clear()
            self._touched.update((run_id, now) for run_id in stale)

    async def list_runs(
        self,
        identity: Identity,
        queue: str,
        states: Sequence[str] = (),
        namespace: str | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> Page:
        """A queue's runs, newest first."""
        self.check(identity, Action.READ, queue)
        try:
            parsed = [RunState(s) for s in states]
        except ValueError:
            known = ", ".join(s.value for s in RunState)
            raise BadRequest(f"state: one of {known}") from None
        if not 1 <= limit <= 1000:
            raise BadRequest("limit: between 1 and 1000")
        try:
            page = await self.store.list_runs(
                queue, states=parsed, namespace=namespace, cursor=cursor, limit=limit
            )
        except ValueError as exc:
            raise BadRequest(f"cursor: {exc}") from None
        return Page([self.with_live_log_bytes(r) for r in page.runs], page.cursor)

    async def status(self, identity: Identity, queue: str) -> dict[str, Any]:
        """Counts by state, the queue's workers, and the age of its oldest queued run."""
        self.check(identity, Action.READ, queue)
        counts = await self.store.counts(queue)
        workers = await self.store.workers(queue)
        for worker in workers:
            worker["connected"] = worker["id"] in self._sessions
            # A queue name is a secret in public mode: only the owner sees the others.
            if identity.kind != "user":
                worker["queues"] = [queue]
            worker["running"] = [r["runId"] for r in worker["running"] if r["queue"] == queue]
        oldest = counts.oldest_queued_at
        return {
            "queue": queue,
            "counts": {state.value: n for state, n in counts.by_state.items()},
            "workers": workers,
            "oldestQueuedSeconds": None if oldest is None else max(0.0, self.clock() - oldest),
        }

    def with_live_log_bytes(self, record: RunRecord) -> RunRecord:
        """A running run's logBytes come from its log file, not from the store."""
        if record.state is RunState.FINISHED:
            return record
        return record.changed(log_bytes=self.logs.size(record.run_id))

    # --- cancel and forget ------------------------------------------------------------------

    async def cancel(
        self, identity: Identity, queue: str | None, job: str, namespace: str | None
    ) -> list[Change]:
        """Cancel a job's run in a queue, or in every queue the caller may see (queue None)."""
        if namespace is not None:
            try:
                check_namespace(namespace)
            except ValueError as exc:
                raise BadRequest(f"namespace: {exc}") from None
        self._check_lookup(identity, Action.CANCEL, queue)
        if queue is not None:
            queues = [queue]
        else:
            runs = await self.store.job_runs(job)
            queues = sorted(
                {r.queue for r in runs if self.policy.allowed(identity, Action.CANCEL, r.queue)}
            )
            if not queues:
                raise NotFound(f"job {job} is not known")
        changes = [await self.store.cancel(q, job, namespace, self.clock()) for q in queues]
        await self._apply(changes)
        return changes

    async def forget(self, identity: Identity, queue: str, job: str) -> int:
        """Forget a job's cached results in a queue."""
        self.check(identity, Action.DELETE, queue)
        return await self.store.forget(queue, job)

    async def _apply(self, changes: Iterable[Change]) -> None:
        """Publish changed runs and tell workers to stop the ones the host ended."""
        for change in changes:
            if not change.changed:
                continue
            self._publish(change.record)
            if change.stop_on_worker is not None:
                self._fences.pop(change.record.run_id, None)
                session = self._sessions.get(change.stop_on_worker)
                if session is not None:
                    await session.stop(change.record.run_id)

    def _publish(self, record: RunRecord) -> None:
        lease = self._fences.get(record.run_id)
        if lease is not None and record.state is RunState.RUNNING:
            lease.record = record  # e.g. a new holder
        self.stats.run_changed(record)
        if record.finished:
            self.callbacks.run_finished()
            self.secrets.drop(record.run_id)
            self.logs.close(record.run_id)  # nothing more is appended (its fence is gone)
        self.bus.publish(RunChanged(record))

    @property
    def active_runs(self) -> int:
        """How many runs are queued or running."""
        return len(self.stats.active)

    def workers_by_queue(self) -> dict[str, int]:
        """How many connected workers serve each queue."""
        serving: dict[str, int] = {}
        for session in list(self._sessions.values()):
            for queue in session.info.queues:
                serving[queue] = serving.get(queue, 0) + 1
        return serving

    def metrics(self, identity: Identity, queue: str) -> bytes:
        """Prometheus text of one queue; the same access as its status."""
        self.check(identity, Action.READ, queue)
        return metrics.queue_metrics(self, queue)

    # --- retention: blob touches and the sweepers -------------------------------------------

    async def has_blob(self, key: str) -> bool:
        """Whether the blob is stored with the bytes its key names (a store that could not
        check an upload hashes it now). Asking counts as a touch: a client that is told "yes"
        skips its upload, so the sweeper must not take the blob before the submission that
        refers to it."""
        info = await self.blobs.check(key)
        if info is None:
            return False
        if self.clock() - info.touched_at > min(3600.0, self.config.blob_grace_seconds / 24):
            with contextlib.suppress(BlobNotFound):
                await self.blobs.touch(key)
        return True

    async def sweep(self) -> tuple[int, int]:
        """Retention: delete expired runs with their logs, then unreferenced old blobs.

        Returns (runs deleted, blobs deleted).
        """
        now = self.clock()
        cutoff = now - self.config.retention_days * DAY
        runs = 0
        while True:
            swept = await self.store.sweep(cutoff, self.config.sweep_batch)
            for run_id in swept.run_ids:
                await asyncio.to_thread(self.logs.delete, run_id)
            runs += len(swept.run_ids)
            if (
                len(swept.run_ids) < self.config.sweep_batch
                and swept.jobs < self.config.sweep_batch
            ):
                break
        blobs = 0
        batch: list[str] = []
        untouched_since = now - self.config.blob_grace_seconds
        async for info in self.blobs.list(touched_before=untouched_since):
            batch.append(info.key)
            if len(batch) >= self.config.sweep_batch:
                blobs += await self._delete_unreferenced(batch, untouched_since)
                batch = []
        blobs += await self._delete_unreferenced(batch, untouched_since)
        return runs, blobs

    async def _delete_unreferenced(self, keys: list[str], untouched_since: float) -> int:
        if not keys:
            return 0
        referenced = await self.store.referenced_blobs(keys)
        deleted = 0
        for key in keys:
            if key in referenced:
                continue
            # Listed a moment ago: someone may have uploaded it again since, for a submission.
            info = await self.blobs.stat(key)
            if (
                info is not None
                and info.touched_at < untouched_since
                and await self.blobs.delete(key)
            ):
                deleted += 1
        return deleted


def _who(identity: Identity) -> str:
    if identity == ANONYMOUS:
        return "an anonymous caller"
    if identity.kind == "worker":
        return f"a worker token for {', '.join(sorted(identity.queues))}"
    return f"user {identity.name!r}" if identity.name else "this user"
