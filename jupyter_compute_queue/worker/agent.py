"""The worker's side of the worker protocol (docs/protocol.md): register, take assignments,
report phases, logs and results, heartbeat, obey cancels, reconnect.

Leases on this side (SPEC §5): the worker stops its own containers once its monotonic clock
says the lease passed without an acknowledged heartbeat (a partitioned worker stops its jobs),
and stops any run that a heartbeat reply no longer lists.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from .._version import __version__
from ..model.capacity import DEFAULT_CPUS
from ..model.jobs import JobDefinition, parse_definition
from ..model.runs import Phase, Reason
from ..wire.outbox import Outbox, abort, loads
from .resources import Allocation, ResourceError, Resources
from .runtime import Run, RunResult, Runtime, RuntimeLost
from .secrets import Redactor, missing_message, resolve

log = logging.getLogger(__name__)

#: Log frames are sent at least this often while a run prints, and at most this big.
LOG_FLUSH_SECONDS = 0.05
LOG_BATCH_BYTES = 256 * 1024
#: On shutdown, how long the runs given back get to remove their containers and folders.
STOP_WAIT_SECONDS = 15.0
#: Bounds of the time a websocket handshake with the host may take (otherwise a lease).
CONNECT_TIMEOUT_MIN = 5.0
CONNECT_TIMEOUT_MAX = 30.0
#: After the runtime lost its engine and got it back, the wait before taking runs again
#: (doubled at every loss in a row).
RECOVER_BACKOFF = 0.5


class FatalError(Exception):
    """The host refused this worker for good (bad credentials, a queue it may not serve)."""


@dataclass
class WorkerOptions:
    """Who the worker is and what it serves."""

    url: str  # the host's compute-queue API, ending in "/"
    token: str | None
    worker_id: str
    queues: tuple[str, ...]
    tags: tuple[str, ...] = ()
    max_job_duration: int = 3600
    grace_seconds: float = 30.0


@dataclass
class _Active:
    run: Run
    task: asyncio.Task[None]
    logs: list[dict[str, Any]] = field(default_factory=list)
    log_bytes: int = 0
    result: RunResult | None = None
    lease_lost: bool = False
    #: Set once the run may start, while it waits for room on this worker (see ``_start``).
    room: asyncio.Event | None = None
    #: Why the run was stopped before it reached the runner (it then never starts).
    stopped: str | None = None
    handed: bool = False  # given to the runner, which stops it from then on
    #: Replaces the run's secret values in its log text before it is sent.
    redactor: Redactor = field(default_factory=lambda: Redactor(()))
    #: Secrets with no value here: the run ends Error without starting.
    missing: list[str] = field(default_factory=list)


class Agent:
    """One worker's connection to its host, and the runs it holds."""

    def __init__(self, options: WorkerOptions, resources: Resources, runner: Runtime) -> None:
        self.options = options
        self.resources = resources
        self.runner = runner
        self.active: dict[str, _Active] = {}
        self._conn: WebSocketClientConnection | None = None
        self._outbox: Outbox | None = None  # the connection's, while there is one
        self._lease_seconds = 30.0
        self._acked = time.monotonic()
        self._sent: list[float] = []  # when each unanswered heartbeat left, oldest first
        self._registered_at = self._acked
        self._draining = False
        self._stopped = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._reporting: asyncio.Future[None] | None = None
        #: Waits for a runtime that lost its engine; nothing is taken meanwhile.
        self._recovering: asyncio.Future[None] | None = None
        self._lost_in_a_row = 0  # runtime losses since a run last ended with a result
        self.connected = asyncio.Event()
        self._tasks: set[asyncio.Future[Any]] = set()  # fire-and-forget sends, kept referenced

    # --- the connection -------------------------------------------------------------------

    async def run_forever(self) -> None:
        """Connect, serve, reconnect with backoff until ``shutdown``."""
        watchdog = asyncio.ensure_future(self._watch_lease())
        try:
            await self._connect_loop()
        finally:
            watchdog.cancel()

    async def _connect_loop(self) -> None:
        delay = 0.5
        while not self._stopped.is_set():
            try:
                conn = await self._connect()
            except FatalError:
                raise
            except (OSError, HTTPClientError, asyncio.TimeoutError) as exc:
                log.warning(
                    "compute-queue worker: cannot reach %s (%s); retrying in %.1fs",
                    self.options.url,
                    exc,
                    delay,
                )
                await self._sleep(delay)
                delay = min(delay * 2, 30.0) * random.uniform(0.8, 1.2)
                continue
            delay = 0.5
            await self._serve(conn)
            self.connected.clear()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), seconds)

    async def _connect(self) -> WebSocketClientConnection:
        url = self.options.url.replace("http", "ws", 1) + "worker"
        headers = {"Authorization": f"token {self.options.token}"} if self.options.token else {}
        # A handshake that hangs (a partition that swallows bytes) is given up after a lease at
        # most: past that, a fresh attempt is worth more than waiting on this one.
        timeout = max(CONNECT_TIMEOUT_MIN, min(CONNECT_TIMEOUT_MAX, self._lease_seconds))
        request = HTTPRequest(
            url, headers=headers, connect_timeout=timeout, request_timeout=timeout
        )
        try:
            conn = await websocket_connect(request)
        except HTTPClientError as exc:
            if exc.code in (401, 403):
                body = exc.response.body.decode(errors="replace") if exc.response else ""
                raise FatalError(f"the host refused this worker ({exc.code}): {body}") from None
            raise
        # Messages are small and come in runs (phases, result, capacity): with Nagle's
        # algorithm each one written while the previous is unacknowledged waits for the host's
        # delayed ACK (40 ms on Linux). Tornado leaves it on for websocket clients.
        if conn.protocol is not None:
            conn.protocol.set_nodelay(True)
        return conn

    async def _serve(self, conn: WebSocketClientConnection) -> None:
        self._conn, self._outbox = conn, Outbox(conn.write_message)
        held = [{"runId": a.run.run_id, "fence": a.run.fence} for a in self.active.values()]
        total = self.resources.total
        self._registered_at = time.monotonic()
        await self.send(
            {
                "type": "register",
                "protocol": 1,
                "id": self.options.worker_id,
                "version": __version__,
                "queues": list(self.options.queues),
                "tags": list(self.options.tags),
                "maxDuration": self.options.max_job_duration,
                "capacity": {"cpus": total.cpus, "memory": total.memory, "gpus": total.gpus},
                "held": held,
                "batch": True,  # it takes the host's messages in `batch` messages too
            }
        )
        heartbeat: asyncio.Task[None] | None = None
        try:
            while True:
                raw = await conn.read_message()
                if raw is None:
                    break
                message = loads(raw)
                batch = message["messages"] if message.get("type") == "batch" else [message]
                for message in batch:
                    if message.get("type") == "registered":
                        self._outbox.batches = bool(message.get("batch"))
                        interval = message["heartbeatSeconds"]
                        heartbeat = asyncio.ensure_future(self._heartbeats(interval))
                    await self._on_message(message)
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
            self._conn = self._outbox = None
            conn.close()  # already closed, unless a FatalError ends the connection

    async def send(self, message: dict[str, Any]) -> bool:
        """Send if connected; False when the message could not go (the caller may keep it).
        The messages of one turn of the loop leave together (see :mod:`.outbox`)."""
        outbox = self._outbox
        return False if outbox is None else await outbox.send(message)

    async def _heartbeats(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            # The host renews the lease when it receives this, which is after now: counting the
            # lease from the send keeps the worker's deadline before the host's.
            self._sent.append(time.monotonic())
            await self.send({"type": "heartbeat"})

    async def _watch_lease(self) -> None:
        """Connected or not: once the lease passed without an acknowledged heartbeat, the host
        has given these runs to someone else, so their containers must stop here.

        A connection that answered nothing for a whole lease is dropped too: a partition can
        leave it open but dead (or losing what is sent through it), and only a new connection
        and registration tell the host what happened here (results it never got, free room)."""
        while True:
            await asyncio.sleep(min(1.0, self._lease_seconds / 10))
            now = time.monotonic()
            if now - self._acked <= self._lease_seconds:
                continue
            for run_id, active in list(self.active.items()):
                if active.result is None and not active.lease_lost:
                    active.lease_lost = True
                    log.warning("compute-queue worker: lease passed; stopping run %s", run_id)
                    await self._stop(run_id, "the worker lost its lease")
            conn = self._conn
            if conn is not None and now - self._registered_at > self._lease_seconds:
                log.warning(
                    "compute-queue worker: the host answered nothing for %.0fs; reconnecting",
                    now - max(self._acked, self._registered_at),
                )
                abort(conn)

    # --- messages from the host -----------------------------------------------------------

    async def _on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "registered":
            self._lease_seconds = float(message["leaseSeconds"])
            self._acked = self._registered_at
            self._sent.clear()
            kept = {h["runId"] for h in message["kept"]}
            for run_id in list(self.active):
                if run_id not in kept:
                    await self._stop(run_id, "the host gave the run to another worker")
            await self.runner.remove_leftovers(set(self.active))
            self.connected.set()
            await self._resend_results()
            await self._report_free()
        elif kind == "assign":
            await self._take(message)
        elif kind == "heartbeat":
            self._acked = self._sent.pop(0) if self._sent else time.monotonic()
            held = {h["runId"] for h in message["held"]}
            for run_id in list(self.active):
                if run_id not in held and self.active[run_id].result is None:
                    await self._stop(run_id, "the host no longer lists this run")
        elif kind in ("cancel", "conflict"):
            run_id = str(message.get("runId"))
            if run_id in self.active:
                await self._stop(run_id, message.get("error") or "cancelled")
                if kind == "conflict" and self.active[run_id].result is not None:
                    self._forget(run_id)  # our result was refused: nothing more to send
        elif kind == "accepted":
            self._forget(message["runId"])
        elif kind == "error":
            if message.get("ref") == "register":
                # Refused for good (a queue the credential does not open, an id of another
                # queue's worker, another protocol): every reconnect would be refused alike.
                raise FatalError(f"the host refused this worker: {message.get('error')}")
            log.warning("compute-queue worker: the host says: %s", message.get("error"))

    async def _take(self, message: dict[str, Any]) -> None:
        """Start an assigned run. One that cannot start here must not end the worker: a
        definition this worker cannot read ends ``Error``; a run that could never fit here goes
        back to the queue, uncounted, after reporting what is really free."""
        run_id, fence = str(message["runId"]), int(message["fence"])
        try:
            self._start(message)
        except ResourceError as exc:  # it can never fit here, or it is already held
            log.warning("compute-queue worker: giving back run %s: %s", run_id, exc)
            await self._report_free()
            await self.send({"type": "give-back", "runIds": [run_id]})
        except ValueError as exc:  # InvalidJob
            log.warning("compute-queue worker: run %s is invalid here: %s", run_id, exc)
            await self.send(
                {
                    "type": "result",
                    "runId": run_id,
                    "fence": fence,
                    "reason": Reason.ERROR.value,
                    "message": f"invalid on this worker: {exc}",
                }
            )
            await self._report_free()

    def _start(self, message: dict[str, Any]) -> None:
        definition = parse_definition(message["definition"])
        run_id = str(message["runId"])
        values, missing = resolve(definition.secrets, message.get("secrets"), os.environ)
        if values:
            # The runtime gets the secrets as part of the container's environment (names never
            # clash: a definition may not list a name both in env and in secrets).
            definition = definition.model_copy(update={"env": {**definition.env, **values}})
        room: asyncio.Event | None = None
        try:
            allocation = self.resources.allocate(
                run_id, definition.cpus, definition.memory, definition.gpus
            )
        except ResourceError:
            needs = _needs(definition)
            if run_id in self.active or not self.resources.total.fits(*needs):
                raise
            # The host counted on capacity that is taken: a `capacity` report crossed this
            # assignment on its way. The run waits here, in order, for the room the runs before
            # it leave (``_make_room``); a give-back would count one more attempt.
            log.info("compute-queue worker: run %s waits for room on this worker", run_id)
            allocation = Allocation(run_id, 0.0, 0, ())
            room = asyncio.Event()
        run = Run(
            run_id=message["runId"],
            job_id=message["jobId"],
            queue=message["queue"],
            fence=int(message["fence"]),
            definition=definition,
            blobs=message.get("blobs", {}),
            job_url=message.get("jobUrl", ""),
            allocation=allocation,
        )
        task = asyncio.ensure_future(self._run(run))
        self.active[run.run_id] = _Active(
            run, task, room=room, redactor=Redactor(values.values()), missing=missing
        )

    def _make_room(self) -> None:
        """Give the waiting runs, oldest first, what they need once it is free."""
        for active in self.active.values():
            if active.room is None or active.room.is_set() or active.stopped is not None:
                continue
            run = active.run
            try:
                run.allocation = self.resources.allocate(run.run_id, *_needs(run.definition))
            except ResourceError:
                return
            active.room.set()

    async def _stop(self, run_id: str, why: str, active: _Active | None = None) -> None:
        """Stop a run: in the runner, or before it gets there."""
        active = active or self.active.get(run_id)
        if active is not None and active.result is not None:
            return  # it ended; only its result waits for the host
        if active is not None and not active.handed:
            active.stopped = why
            if active.room is not None:
                active.room.set()
            return
        await self.runner.stop(run_id, why)

    async def _run(self, run: Run) -> None:
        active = self.active[run.run_id]
        if active.room is not None:
            await active.room.wait()

        def phase(value: Phase, digest: str | None) -> None:
            self._background(
                self.send(
                    {
                        "type": "phase",
                        "runId": run.run_id,
                        "fence": run.fence,
                        "phase": value.value,
                        **({"imageDigest": digest} if digest else {}),
                    }
                )
            )

        def logs(stream: str, text: str) -> None:
            if active.redactor:
                text = active.redactor.feed(stream, text)
            if text:
                active.logs.append({"s": stream, "d": text, "t": int(time.time() * 1000)})
                active.log_bytes += len(text)
                self._schedule_flush()

        lost: str | None = None  # why the runtime could not carry the run to its end
        if active.stopped is not None:
            result = RunResult(Reason.CANCELLED, message=active.stopped)
        elif active.missing:  # never run a container without its secrets
            result = RunResult(Reason.ERROR, message=missing_message(active.missing))
        else:
            active.handed = True
            try:
                result = await self.runner.run(run, phase, logs)
            except RuntimeLost as exc:
                lost = str(exc)
            except Exception as exc:  # a bug of ours must still end the run with a result
                log.exception("compute-queue worker: run %s failed", run.run_id)
                result = RunResult(Reason.ERROR, message=f"the worker failed: {exc}")
        self.resources.release(run.run_id)
        self._make_room()
        if self.active.get(run.run_id) is not active:
            return  # given back while shutting down: the host has queued it again
        if lost is not None:
            await self._give_back_lost(active, lost)
            return
        self._lost_in_a_row = 0
        for stream, text in active.redactor.flush():  # the ends held back: no value in them
            active.logs.append({"s": stream, "d": text, "t": int(time.time() * 1000)})
        await self._flush(run.run_id)
        active.result = result
        await self._send_result(active)
        self._report_free_soon()

    async def _give_back_lost(self, active: _Active, why: str) -> None:
        """The runtime lost its engine under a run: the run goes back to the queue, counted as
        lost (a job that kills the engine every time ends WorkerLost at the host's max_lost),
        and this worker takes nothing until its runtime is back."""
        run_id = active.run.run_id
        log.warning("compute-queue worker: %s; giving run %s back", why, run_id)
        active.logs.append(
            {"s": "sys", "d": f"{why}: the run is given back, counted as lost\n", "t": _now_ms()}
        )
        await self._flush(run_id)
        self._forget(run_id)
        if self._recovering is None:
            self._recovering = asyncio.ensure_future(self._recover())
        await self._report_free()  # nothing free first, or the run would come straight back
        await self.send({"type": "give-back", "runIds": [run_id], "counted": True})

    async def _recover(self) -> None:
        """Wait for the runtime, clean up what the lost runs left, then take runs again.

        Losses in a row wait longer each time (up to 30 s): a runtime that says it is back but
        loses every run must not bounce runs through the host as fast as it can."""
        self._lost_in_a_row += 1
        try:
            await self.runner.recovered()
            await asyncio.sleep(min(30.0, RECOVER_BACKOFF * 2 ** (self._lost_in_a_row - 1)))
            log.warning("compute-queue worker: the runtime is back; taking runs again")
            with contextlib.suppress(Exception):  # else removed at the next registration
                await self.runner.remove_leftovers(set(self.active))
        finally:
            self._recovering = None
        await self._report_free()

    def _background(self, job: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_result(self, active: _Active) -> None:
        result, run = active.result, active.run
        assert result is not None
        await self.send(
            {
                "type": "result",
                "runId": run.run_id,
                "fence": run.fence,
                "reason": result.reason.value,
                "exitCode": result.exit_code,
                "message": result.message,
                "imageDigest": result.image_digest,
                "outputs": {p: o.model_dump() for p, o in result.outputs.items()},
            }
        )

    async def _resend_results(self) -> None:
        for active in list(self.active.values()):
            if active.result is not None:
                await self._send_result(active)

    def _forget(self, run_id: str) -> None:
        self.active.pop(run_id, None)
        if self._draining and not self.active:
            self._stopped.set()

    def _report_free_soon(self) -> None:
        """One capacity report for every run that ends in this turn of the loop: a busy
        worker's runs end in bursts, and each report costs the host a claim."""
        if self._reporting is None or self._reporting.done():
            self._reporting = asyncio.ensure_future(self._report_after_turn())

    async def _report_after_turn(self) -> None:
        await asyncio.sleep(0)
        await self._report_free()

    async def _report_free(self) -> None:
        free = self.resources.free
        for active in self.active.values():
            if active.room is not None and not active.room.is_set():
                cpus, memory, gpus = _needs(active.run.definition)
                free = free.minus(type(free)(cpus, memory, gpus))  # promised to a waiting run
        free = type(free)(
            max(free.cpus, 0.0),
            None if free.memory is None else max(free.memory, 0),
            max(free.gpus, 0),
        )
        if self._draining or self._recovering is not None:
            free = type(free)(0, 0, 0)
        await self.send(
            {
                "type": "capacity",
                "free": {"cpus": free.cpus, "memory": free.memory, "gpus": free.gpus},
            }
        )

    # --- logs -----------------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(LOG_FLUSH_SECONDS)
        for run_id in list(self.active):
            await self._flush(run_id)

    async def _flush(self, run_id: str) -> None:
        active = self.active.get(run_id)
        while active is not None and active.logs:
            batch, size = [], 0
            while active.logs and size < LOG_BATCH_BYTES:
                frame = active.logs.pop(0)
                batch.append(frame)
                size += len(frame["d"])
            active.log_bytes -= size
            # While disconnected, lines are dropped: the host has no one to give them to and
            # the run keeps going; the result (kept until accepted) is what must not be lost.
            await self.send(
                {"type": "logs", "runId": run_id, "fence": active.run.fence, "frames": batch}
            )

    # --- shutting down --------------------------------------------------------------------

    async def shutdown(self, grace: float | None = None) -> None:
        """SIGTERM: take no more work, let runs finish for ``grace`` seconds, then stop the rest
        and give them back (uncounted), say goodbye and return."""
        self._draining = True
        await self._report_free()
        wait = self.options.grace_seconds if grace is None else grace
        tasks = [a.task for a in self.active.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=wait)
        unfinished = [run_id for run_id, a in self.active.items() if not a.task.done()]
        if unfinished:
            await self.send({"type": "give-back", "runIds": unfinished})
            given = [self.active.pop(run_id) for run_id in unfinished]  # no results for these
            why = "the worker is shutting down"
            await asyncio.gather(*(self._stop(a.run.run_id, why, a) for a in given))
            # Let the runner remove their containers and run folders: once this returns, the
            # process ends, and a run still cleaning up would leave its container behind.
            await asyncio.wait([a.task for a in given], timeout=STOP_WAIT_SECONDS)
        await self.send({"type": "goodbye"})
        # Finished runs' containers and folders may still be being removed.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.runner.close(), STOP_WAIT_SECONDS)
        self._stopped.set()
        if self._conn is not None:
            self._conn.close()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _needs(definition: JobDefinition) -> tuple[float, int, int]:
    """What a run takes on a worker (cpus, memory bytes, gpus), with the host's defaults."""
    cpus = DEFAULT_CPUS if definition.cpus is None else definition.cpus
    return cpus, definition.memory or 0, definition.gpus
