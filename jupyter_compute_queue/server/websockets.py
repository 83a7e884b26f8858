"""The two websockets: ``q/{queue}/ws`` for people watching a queue, ``worker`` for workers.

Both are thin: they parse envelopes, call the service and send what it answers. The message
formats are in docs/protocol.md. A malformed message gets an ``error`` message and the
connection stays; nothing a peer sends can raise out of a handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.base.websocket import WebSocketMixin
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado import web
from tornado.websocket import WebSocketClosedError, WebSocketHandler

from ..host.access import ANONYMOUS, Action
from ..host.events import LogsAppended, Overflow, RunChanged, Subscription, WorkerChanged
from ..host.store.base import Assignment, Held, Outcome, WorkerInfo
from ..model.capacity import Capacity
from ..model.jobs import check_path
from ..model.runs import OutputRef, Phase, Reason, RunState
from ..wire.outbox import Outbox, dumps, loads
from .base import CallerMixin, allow_unauthenticated, surrogate_error
from .worker_batch import ProtocolError, accepted, handle_batch, refusal

PROTOCOL = 1
#: Log records per message are cut at about this many bytes of text.
LOG_CHUNK = 256 * 1024


def field(msg: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """A message field of the right type, or ProtocolError naming it."""
    if name not in msg or msg[name] is None:
        if default is ...:
            raise ProtocolError(f"{msg.get('type')}: '{name}' is missing")
        return default
    value = msg[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _tuple(kind)):
        raise ProtocolError(f"{msg.get('type')}: '{name}' has the wrong type")
    return value


def _tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


class SocketBase(
    CallerMixin, ExtensionHandlerMixin, WebSocketMixin, WebSocketHandler, JupyterHandler
):
    """Authentication before the upgrade, JSON envelopes after it."""

    def open(self, *args: Any, **kwargs: Any) -> None:
        # Messages are small and often follow each other (accepted, then assign): with Nagle's
        # algorithm one written while the previous is unacknowledged waits for the peer's
        # delayed ACK, 40 ms on Linux, on every run's assignment (benchmarks/RESULTS.md).
        self.set_nodelay(True)
        super().open(*args, **kwargs)

    async def send(self, message: dict[str, Any]) -> None:
        """Send one envelope, waiting until it is flushed (so a slow peer slows only itself)."""
        with contextlib.suppress(WebSocketClosedError):  # the peer left; on_close cleans up
            await self.write_message(_dumps(message))

    async def refuse(self, error: str, ref: Any = None) -> None:
        await self.send({"type": "error", "error": error, **({"ref": ref} if ref else {})})

    def parse(self, message: str | bytes) -> dict[str, Any]:
        try:
            msg = loads(message)  # json's reading and errors, mostly at orjson's speed
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ProtocolError(f"not JSON: {exc}") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            raise ProtocolError('every message is a JSON object with a "type"')
        bad = surrogate_error(message, msg)
        if bad is not None:
            raise ProtocolError(bad)
        return msg


class QueueSocket(SocketBase):
    """Live run states of one queue, and log streams of the runs a client subscribes to."""

    _sub: Subscription | None = None
    _pump: asyncio.Task[None] | None = None

    @allow_unauthenticated
    async def get(self, queue: str) -> None:
        await self.resolve_caller()
        self.service.check(self.identity, Action.READ, queue)
        self.queue = queue
        self._offsets: dict[str, int] = {}  # run id → next log offset to send
        self._log_locks: dict[str, asyncio.Lock] = {}
        await super().get(queue)

    def open(self, queue: str) -> None:
        super().open()
        self._sub = self.service.bus.subscribe(queue)
        self._pump = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        assert self._sub is not None
        await self._snapshot()
        while True:
            event = await self._sub.get()
            if isinstance(event, Overflow):
                await self.send({"type": "overflow"})
                await self._snapshot()
                for run_id in list(self._offsets):
                    await self._send_logs(run_id)
            elif isinstance(event, RunChanged):
                record = self.service.with_live_log_bytes(event.record)
                await self.send({"type": "run", "run": record.wire()})
                if event.record.run_id in self._offsets and event.record.finished:
                    await self._send_logs(event.record.run_id)
            elif isinstance(event, LogsAppended):
                if event.run_id in self._offsets:
                    await self._send_logs(event.run_id)
            elif isinstance(event, WorkerChanged):
                await self.send({"type": "worker", "id": event.worker_id, "worker": event.info})

    async def _snapshot(self) -> None:
        page = await self.service.list_runs(self.identity, self.queue, limit=100)
        status = await self.service.status(self.identity, self.queue)
        await self.send(
            {
                "type": "snapshot",
                "queue": self.queue,
                "runs": [r.wire() for r in page.runs],
                "counts": status["counts"],
                "workers": status["workers"],
            }
        )

    async def on_message(self, message: str | bytes) -> None:
        try:
            msg = self.parse(message)
            kind = msg["type"]
            if kind == "subscribe":
                await self._subscribe(field(msg, "runId", str), field(msg, "since", int, 0))
            elif kind == "unsubscribe":
                self._offsets.pop(field(msg, "runId", str), None)
            elif kind == "ping":
                await self.send({"type": "pong"})
            else:
                raise ProtocolError(f"unknown message type {kind!r}")
        except ProtocolError as exc:
            await self.refuse(str(exc))

    async def _subscribe(self, run_id: str, since: int) -> None:
        record = await self.service.store.get_run(run_id)
        if record is None or record.queue != self.queue:
            raise ProtocolError(f"subscribe: no run {run_id} in queue {self.queue!r}")
        if since < 0:
            raise ProtocolError("subscribe: 'since' is a byte offset, 0 or more")
        self._offsets[run_id] = since
        await self._send_logs(run_id)

    async def _send_logs(self, run_id: str) -> None:
        """Send the run's log from this client's offset to its current end: a replay and the
        live tail go through here alike, so the seam has no gap and no repeat."""
        lock = self._log_locks.setdefault(run_id, asyncio.Lock())
        async with lock:
            logs = self.service.logs
            while run_id in self._offsets:
                since = self._offsets[run_id]
                records = await asyncio.to_thread(logs.read_records, run_id, since, LOG_CHUNK)
                if records:
                    self._offsets[run_id] = records[-1].end
                record = await self.service.store.get_run(run_id) if not records else None
                done = record is not None and record.state is RunState.FINISHED
                if records or done:
                    await self.send(
                        {
                            "type": "logs",
                            "runId": run_id,
                            "records": [r.to_json() for r in records],
                            "next": self._offsets[run_id],
                            "done": done,
                        }
                    )
                if not records:
                    if done:
                        self._offsets.pop(run_id, None)
                    return

    def on_close(self) -> None:
        if self._sub is not None:
            self._sub.close()
        if self._pump is not None:
            self._pump.cancel()


class WorkerSocket(SocketBase):
    """The worker protocol of SPEC §5, one socket per worker serving all its queues."""

    worker_id: str | None = None
    _graceful = False
    #: Once the worker said it takes batches: what this socket sends leaves batched.
    _outbox: Outbox | None = None

    @allow_unauthenticated
    async def get(self) -> None:
        await self.resolve_caller()
        if self.identity == ANONYMOUS:
            raise web.HTTPError(401, "a worker needs the Jupyter token or a worker credential")
        await super().get()

    async def on_message(self, message: str | bytes) -> None:
        try:
            msg = self.parse(message)
        except ProtocolError as exc:
            await self.refuse(str(exc))
            return
        answer = await self.handle(msg)
        if answer is not None:
            await self.send(answer)

    async def handle(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        """Act on one message. Its answers are sent by its handler, except a refusal, which is
        returned (a batch sends it after the answers it still owes: see worker_batch.py)."""
        try:
            handler = getattr(self, "_on_" + msg["type"].replace("-", "_"), None)
            if handler is None:
                raise ProtocolError(f"unknown message type {msg['type']!r}")
            if msg["type"] != "register" and self.worker_id is None:
                raise ProtocolError("register first")
            await handler(msg)
        except Exception as exc:
            answer = refusal(exc, msg)
            if answer is None:
                raise
            return answer
        return None

    async def _on_register(self, msg: dict[str, Any]) -> None:
        if field(msg, "protocol", int) != PROTOCOL:
            raise ProtocolError(f"register: this host speaks protocol {PROTOCOL}")
        capacity = field(msg, "capacity", dict)
        for name in ("queues", "tags"):
            if not all(isinstance(v, str) for v in msg.get(name) or []):
                raise ProtocolError(f"register: '{name}' is a list of strings")
        if not all(isinstance(h, dict) for h in msg.get("held") or []):
            raise ProtocolError("register: 'held' is a list of {runId, fence}")
        info = WorkerInfo(
            worker_id=field(msg, "id", str),
            queues=tuple(field(msg, "queues", list)),
            capacity=_capacity(capacity),
            version=field(msg, "version", str, None),
            tags=frozenset(field(msg, "tags", list, [])),
            max_duration=field(msg, "maxDuration", int, 3600),
        )
        held = [
            Held(field(h, "runId", str), field(h, "fence", int))
            for h in field(msg, "held", list, [])
        ]
        if self.worker_id is not None and self.worker_id != info.worker_id:
            raise ProtocolError("register: one socket serves one worker id")
        takes_batches = field(msg, "batch", bool, False)
        kept = await self.service.connect_worker(
            self.identity, info, held, self._deliver, self._stop, owner=self
        )
        self.worker_id = info.worker_id
        if takes_batches and self._outbox is None:
            self._outbox = Outbox(self.write_message, _fast_dumps)
            self._outbox.batches = True
        lease = self.service.config.lease_seconds
        await self.send(
            {
                "type": "registered",
                "leaseSeconds": lease,
                "heartbeatSeconds": lease / 6,
                "kept": [{"runId": h.run_id, "fence": h.fence} for h in kept],
                "batch": True,  # this host takes `batch` messages
            }
        )

    async def send(self, message: dict[str, Any]) -> None:
        if self._outbox is not None:  # False when the peer left: on_close cleans up
            await self._outbox.send(message)
            return
        with contextlib.suppress(WebSocketClosedError):
            await self.write_message(_fast_dumps(message))

    async def send_all(self, messages: list[dict[str, Any]]) -> None:
        """Send several messages in order (in one frame to a worker that takes batches)."""
        if self._outbox is not None:
            await self._outbox.send_all(messages)
        else:
            for message in messages:
                await self.send(message)

    async def _on_batch(self, msg: dict[str, Any]) -> None:
        await handle_batch(self, field(msg, "messages", list))

    async def _on_capacity(self, msg: dict[str, Any]) -> None:
        assert self.worker_id is not None
        await self.service.report_free(self.worker_id, _capacity(field(msg, "free", dict)))

    async def _on_heartbeat(self, msg: dict[str, Any]) -> None:
        assert self.worker_id is not None
        held = await self.service.heartbeat(self.worker_id)
        await self.send(
            {"type": "heartbeat", "held": [{"runId": h.run_id, "fence": h.fence} for h in held]}
        )

    async def _on_phase(self, msg: dict[str, Any]) -> None:
        assert self.worker_id is not None
        try:
            phase = Phase(field(msg, "phase", str))
        except ValueError:
            raise ProtocolError(f"phase: one of {', '.join(p.value for p in Phase)}") from None
        await self.service.set_phase(
            self.worker_id,
            field(msg, "runId", str),
            field(msg, "fence", int),
            phase,
            field(msg, "imageDigest", str, None),
        )

    async def _on_logs(self, msg: dict[str, Any]) -> None:
        assert self.worker_id is not None
        frames = []
        for frame in field(msg, "frames", list):
            if not isinstance(frame, dict):
                raise ProtocolError("logs: every frame is an object {s, d, t}")
            frames.append(
                (field(frame, "s", str), field(frame, "d", str), field(frame, "t", int, None))
            )
        self.service.append_logs(
            self.worker_id, field(msg, "runId", str), field(msg, "fence", int), frames
        )

    async def _on_result(self, msg: dict[str, Any]) -> None:
        assert self.worker_id is not None
        run_id, fence, outcome = self.result_of(msg)
        record = await self.service.finish(self.worker_id, run_id, fence, outcome)
        await self.send(accepted(run_id, fence, record))

    def result_of(self, msg: dict[str, Any]) -> tuple[str, int, Outcome]:
        """A ``result`` message's run, fence and outcome; ProtocolError if it is malformed."""
        try:
            reason = Reason(field(msg, "reason", str))
            outputs = {
                path: OutputRef.model_validate(out)
                for path, out in field(msg, "outputs", dict, {}).items()
            }
        except ValueError as exc:
            raise ProtocolError(f"result: {exc}") from None
        for path in outputs:  # no way out of the outputs folder, nor through a backslash
            try:
                check_path(path.replace("\\", "/"))
            except ValueError as exc:
                raise ProtocolError(f"result: output {exc}") from None
        outcome = Outcome(
            reason=reason,
            exit_code=field(msg, "exitCode", int, None),
            message=field(msg, "message", str, None),
            outputs=outputs,
            image_digest=field(msg, "imageDigest", str, None),
        )
        return field(msg, "runId", str), field(msg, "fence", int), outcome

    async def _on_give_back(self, msg: dict[str, Any]) -> None:
        assert self.worker_id is not None
        run_ids = field(msg, "runIds", list, None)
        if not all(isinstance(r, str) for r in run_ids or []):
            raise ProtocolError("give-back: 'runIds' is a list of run ids")
        counted = field(msg, "counted", bool, False)  # lost under the worker, not handed back
        await self.service.give_back(self.worker_id, run_ids, counted=counted)

    async def _on_goodbye(self, msg: dict[str, Any]) -> None:
        self._graceful = True
        self.close(1000, "goodbye")

    async def _deliver(self, assignment: Assignment) -> None:
        run = assignment.record
        base = self.public_base()
        blobs = {}
        for ref in _refs(assignment.definition):
            if ref.get("type") == "key":
                key = ref["value"]
                blobs[key] = (
                    await self.service.blobs.download_url(key, key, "application/octet-stream")
                    or f"{base}f/{key}"
                )
        await self.send(
            {
                "type": "assign",
                "runId": run.run_id,
                "jobId": run.job_id,
                "queue": run.queue,
                "fence": assignment.fence,
                "attempt": run.attempt,
                "definition": assignment.definition,
                "blobs": blobs,
                "jobUrl": f"{base}q/{run.queue}/j/{run.job_id}",
                # Secret values: only in this message, from the host's memory (never stored).
                **({"secrets": v} if (v := self.service.secrets.get(run.run_id)) else {}),
            }
        )

    async def _stop(self, run_id: str) -> None:
        await self.send({"type": "cancel", "runId": run_id})

    def on_close(self) -> None:
        if self.worker_id is not None:
            task = asyncio.ensure_future(
                self.service.disconnect_worker(self.worker_id, self._graceful, owner=self)
            )
            _closing.add(task)
            task.add_done_callback(_closing.discard)


_closing: set[asyncio.Future[None]] = set()


async def closing_sockets(timeout: float = 5.0) -> None:
    """Wait (a bounded time) for the disconnect work of worker sockets that closed."""
    if _closing:
        await asyncio.wait(set(_closing), timeout=timeout)


def _capacity(data: dict[str, Any]) -> Capacity:
    try:
        cpus = float(data.get("cpus", 0))
        memory = data.get("memory")
        return Capacity(cpus, None if memory is None else int(memory), int(data.get("gpus", 0)))
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(1e400)
        raise ProtocolError("capacity: {cpus: number, memory: bytes or null, gpus: int}") from None


def _refs(definition: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        ref
        for name in ("inputs", "configFiles")
        for ref in (definition.get(name) or {}).values()
        if isinstance(ref, dict)
    ]


def _dumps(message: dict[str, Any]) -> str:
    return json.dumps(message, ensure_ascii=False)


def _fast_dumps(message: dict[str, Any]) -> str | bytes:
    """For the worker socket: its messages only go to our worker, which reads any spelling."""
    return dumps(message, ensure_ascii=False)
