"""The worker side of the queue service: connected workers, push dispatch, fences, results
and lease expiry (SPEC §5). ``QueueService`` inherits it; it holds no HTTP either."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from ..model.capacity import Capacity
from ..model.runs import Phase, Reason, RunRecord, RunState
from .access import Action, Identity
from .events import EventBus, LogsAppended, WorkerChanged
from .logs import LogStore
from .service_base import BadRequest, Forbidden, ServiceConfig
from .store.base import Assignment, Conflict, Held, NotFound, Outcome, Store, WorkerInfo

#: How a service hands an assignment to a connected worker.
Deliver = Callable[[Assignment], Awaitable[None]]
#: How a service tells a connected worker to stop a run.
Stop = Callable[[str], Awaitable[None]]
#: Runs claimed for one worker per transaction (a worker with room for many gets them in one
#: commit instead of one commit each).
CLAIM_BATCH = 32

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Lease:
    """A run the host handed to a connected worker: its fence and latest record, kept in
    memory so a worker's phase and log messages need no store read. Its record is replaced in
    place as the run changes (a copy per phase was a measurable cost)."""

    fence: int
    worker_id: str
    record: RunRecord


@dataclass
class WorkerSession:
    """A connected worker: what it is, what it has free, and how to reach it."""

    info: WorkerInfo
    deliver: Deliver
    stop: Stop
    free: Capacity
    #: The connection this session belongs to: a late close of an older connection of the
    #: same worker must not end the newer one.
    owner: object = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class WorkerSide:
    """Sessions of connected workers and the rules for their runs (mixed into the service)."""

    store: Store
    logs: LogStore
    config: ServiceConfig
    bus: EventBus
    clock: Callable[[], float]
    _sessions: dict[str, WorkerSession]
    stopped: bool
    _fences: dict[str, Lease]  # run id → the lease the host gave out for it
    # Defined by the service: the access check, how a changed run is announced, and whether
    # a blob is stored with the bytes its key names.
    check: Callable[[Identity, Action, str | None], None]
    _publish: Callable[[RunRecord], None]
    has_blob: Callable[[str], Awaitable[bool]]

    async def connect_worker(
        self,
        identity: Identity,
        info: WorkerInfo,
        held: Sequence[Held],
        deliver: Deliver,
        stop: Stop,
        owner: object = None,
    ) -> list[Held]:
        """Register a connected worker; returns the runs it may keep (it stops the others)."""
        if not info.queues:
            raise BadRequest("queues: a worker serves at least one queue")
        for queue in info.queues:
            self.check(identity, Action.WORK, queue)
        if identity.kind != "user":
            # A worker id is taken over only with credentials for every queue it served, or a
            # token for one queue could requeue (or answer for) another queue's runs.
            known = await self.store.workers()
            before = next((w for w in known if w["id"] == info.worker_id), None)
            if before is not None and not set(before["queues"]) <= identity.queues:
                raise Forbidden(
                    f"worker id {info.worker_id!r} belongs to a worker of other queues: "
                    "choose another id"
                )
        now = self.clock()
        reg = await self.store.register_worker(
            info, held, now, self.config.lease_seconds, self.config.max_lost
        )
        for record in reg.lost:
            self._fences.pop(record.run_id, None)
            self._publish(record)
        for kept in reg.kept:
            run = await self.store.get_run(kept.run_id)
            if run is not None:
                self._fences[kept.run_id] = Lease(kept.fence, info.worker_id, run)
        # Nothing is assigned until the worker says what it has free: it knows what it runs.
        self._sessions[info.worker_id] = WorkerSession(
            info, deliver, stop, Capacity(0, 0, 0), owner
        )
        self.bus.publish(WorkerChanged(info.queues, info.worker_id, {"connected": True}))
        if reg.lost:
            await self.dispatch_all({r.queue for r in reg.lost})
        return reg.kept

    async def disconnect_worker(self, worker_id: str, graceful: bool, owner: object = None) -> None:
        """A worker's socket closed. Graceful: its runs go back uncounted; else its lease runs
        out on its own (it may reconnect in time and keep them)."""
        session = self._sessions.get(worker_id)
        if session is None or session.owner is not owner:
            return  # an older connection of a worker that has connected again since
        del self._sessions[worker_id]
        if graceful and not self.stopped:  # at shutdown the store is closing: leases expire
            await self.give_back(worker_id, None)
            await self.store.drop_worker(worker_id)
        self.bus.publish(WorkerChanged(session.info.queues, worker_id, None))

    async def give_back(
        self, worker_id: str, run_ids: Sequence[str] | None, counted: bool = False
    ) -> list[RunRecord]:
        """A worker hands runs back (all for None): they are queued again at their old place
        and offered to the other workers. Uncounted (a graceful give-back, e.g. on SIGTERM),
        or ``counted``: the worker lost them (its Docker engine went away under them), which
        counts like an expired lease, so a job that takes the engine down every time ends
        WorkerLost at ``max_lost`` instead of going round forever."""
        if counted:
            back = await self.store.give_back(
                worker_id, run_ids, now=self.clock(), max_lost=self.config.max_lost
            )
        else:
            back = await self.store.give_back(worker_id, run_ids)
        for record in back:
            self._fences.pop(record.run_id, None)
            self._publish(record)
        await self.dispatch_all({r.queue for r in back if r.state is RunState.QUEUED})
        return back

    async def heartbeat(self, worker_id: str) -> list[Held]:
        """Renew a worker's lease; the runs it still holds (it stops any other)."""
        return await self.store.heartbeat(worker_id, self.clock(), self.config.lease_seconds)

    async def report_free(self, worker_id: str, free: Capacity) -> None:
        """A worker's free capacity changed: assign it what fits."""
        session = self._session(worker_id)
        session.free = free
        await self._fill(session)

    async def dispatch(self, queue: str) -> None:
        """Offer a queue's runs to the connected workers that serve it.

        All at once: their claims are queued in this order, so they land in one group commit
        and take runs as one after the other would, instead of each waiting for a commit of its
        own (ten workers made a submission wait for ten commits: benchmarks/RESULTS.md)."""
        serving = [s for s in self._sessions.values() if queue in s.info.queues]
        await asyncio.gather(*(self._fill(session) for session in serving))

    async def dispatch_all(self, queues: Iterable[str]) -> None:
        for queue in sorted(set(queues)):
            await self.dispatch(queue)

    async def _fill(self, session: WorkerSession) -> None:
        worker_id = session.info.worker_id
        async with session.lock:
            while self._sessions.get(worker_id) is session:
                try:
                    claimed = await self.store.claim_many(
                        session.info, session.free, self.clock(), CLAIM_BATCH
                    )
                except NotFound:  # its lease ran out: it must register again
                    return
                for assignment in claimed:
                    session.free = session.free.minus(assignment.needs)
                    run = assignment.record
                    self._fences[run.run_id] = Lease(assignment.fence, worker_id, run)
                    self._publish(run)
                # All at once: a socket that batches sends a claim's assignments in one frame.
                await asyncio.gather(*(session.deliver(a) for a in claimed))
                if len(claimed) < CLAIM_BATCH:
                    return  # the store took every run that fit

    def _session(self, worker_id: str) -> WorkerSession:
        session = self._sessions.get(worker_id)
        if session is None:
            raise NotFound(f"worker {worker_id!r} is not connected")
        return session

    def _check_fence(self, run_id: str, fence: int, worker_id: str) -> Lease:
        """The run's lease if this is the current assignment; Conflict otherwise."""
        current = self._fences.get(run_id)
        if current is None or current.fence != fence or current.worker_id != worker_id:
            raise Conflict(f"run {run_id} is not yours under fence {fence}: stop it")
        return current

    async def set_phase(
        self, worker_id: str, run_id: str, fence: int, phase: Phase, image_digest: str | None = None
    ) -> None:
        """A worker reports what its run is doing.

        Watchers hear it at once from the record kept with the lease; the store gets it with
        the next group commit, and nobody waits for that: a phase is live information (a host
        that crashes before the commit shows the previous phase until the next report), and
        waiting would hold the worker's next message behind a disk flush four times a run."""
        lease = self._check_fence(run_id, fence, worker_id)
        record = lease.record.changed(
            phase=phase, image_digest=image_digest or lease.record.image_digest
        )
        lease.record = record
        self._publish(record)
        self.store.set_phase_later(run_id, fence, worker_id, phase, image_digest).add_done_callback(
            _log_failure
        )

    def append_logs(
        self,
        worker_id: str,
        run_id: str,
        fence: int,
        frames: Iterable[tuple[str, str | bytes, int | None]],
    ) -> int:
        """A worker's log frames for a run it holds; returns the log's new length."""
        queue = self._check_fence(run_id, fence, worker_id).record.queue
        end = self.logs.append_many(run_id, frames)
        self.bus.publish(LogsAppended(queue, run_id, end))
        return end

    async def finish(self, worker_id: str, run_id: str, fence: int, outcome: Outcome) -> RunRecord:
        """A worker's result. Conflict for a stale fence; a duplicate is accepted unchanged."""
        outcome = await self._check_outputs(replace(outcome, log_bytes=self.logs.size(run_id)))
        change = await self.store.finish(run_id, fence, worker_id, outcome, self.clock())
        self._fences.pop(run_id, None)
        self.logs.close(run_id)
        if change.changed:
            self._publish(change.record)
        return change.record

    async def _check_outputs(self, outcome: Outcome) -> Outcome:
        """A run's outputs must be on the host with the bytes their keys name (an S3 upload
        bypasses the host, which checks it here): the others are dropped from the result, and
        a run missing some is not a Success."""
        if not outcome.outputs:
            return outcome
        limit = asyncio.Semaphore(16)

        async def present(key: str) -> bool:
            async with limit:
                return await self.has_blob(key)

        found = await asyncio.gather(*(present(o.key) for o in outcome.outputs.values()))
        missing = sorted(p for p, ok in zip(outcome.outputs, found, strict=True) if not ok)
        if not missing:
            return outcome
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        why = f"outputs not stored on the host: {', '.join(missing[:5])}{more}"
        kept = {p: o for p, o in outcome.outputs.items() if p not in missing}
        if outcome.reason is Reason.SUCCESS:
            return replace(outcome, outputs=kept, reason=Reason.ERROR, message=why)
        message = f"{outcome.message}; {why}" if outcome.message else why
        return replace(outcome, outputs=kept, message=message)

    async def expire_leases(self) -> list[RunRecord]:
        """Requeue the runs of workers whose lease passed (WorkerLost at max_lost)."""
        changed = await self.store.expire_leases(self.clock(), self.config.max_lost)
        for record in changed:
            self._fences.pop(record.run_id, None)
            self._publish(record)
        await self.dispatch_all({r.queue for r in changed if r.state is RunState.QUEUED})
        return changed


def _log_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("a phase update was not stored: %s", future.exception())
