"""Following a queue live: its websocket (``q/{queue}/ws``) in a background thread, and
:class:`LogStream`, a run's log as an iterator that falls back to polling the REST routes."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import queue as queue_module
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ..model.log_records import LogRecord
from .errors import ComputeQueueError, JobTimeout
from .http import Closing, HttpClient, safe

log = logging.getLogger("jupyter_compute_queue.client")


class Followed(Protocol):
    """The run whose log a :class:`LogStream` follows (a :class:`.job.JobBase`): a protocol,
    so that the job can import this module and not the other way round."""

    @property
    def client(self) -> HttpClient: ...
    @property
    def job_id(self) -> str: ...
    @property
    def queue(self) -> str: ...
    @property
    def run_id(self) -> str: ...
    @property
    def finished(self) -> bool: ...

    def refresh(self) -> Followed: ...

    def log_records(self, since: int = 0) -> list[LogRecord]: ...


def record_from_json(data: Mapping[str, Any]) -> LogRecord:
    cut = data.get("cut")
    return LogRecord(
        o=int(data["o"]),
        t=int(data.get("t", 0)),
        s=str(data.get("s", "")),
        d=str(data.get("d", "")),
        cut=int(cut) if isinstance(cut, int) else 0,
    )


def remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


@dataclass
class SocketFailed:
    """The websocket could not be opened, or was refused (the reader falls back to REST,
    which raises the host's own error if it is refused too)."""

    error: ComputeQueueError


class SocketEnd:
    """The websocket thread has ended."""


SocketItem = dict[str, Any] | SocketFailed | SocketEnd


class QueueSocket(Closing):
    """The queue's websocket (``q/{queue}/ws``) in a background thread with its own event loop.

    Messages arrive in a bounded queue (``get``), so a slow reader slows the socket, not
    memory. With ``run_id`` the run's log is subscribed from ``since``; after a dropped
    connection the thread reconnects and subscribes again from the ``next`` offset of the last
    log message, so nothing is lost or repeated. The subscription's ``done`` ends the thread.
    """

    def __init__(
        self,
        client: HttpClient,
        queue: str,
        run_id: str | None = None,
        since: int = 0,
        retries: int = 4,
    ) -> None:
        self._url = client._ws_url(queue)
        self._headers = client._auth_headers()
        self._timeout = min(client.timeout, 30.0)
        self._run_id = run_id
        self._since = since
        self._retries = retries  # reconnects after a drop; a first connection is tried twice
        self._items: queue_module.Queue[SocketItem] = queue_module.Queue(maxsize=64)
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: Any = None
        #: How many times a connection was opened (a reconnect counts again).
        self.connections = 0
        self._thread = threading.Thread(
            target=self._main, name=f"compute-queue-ws-{queue}", daemon=True
        )
        self._thread.start()

    def get(self, timeout: float) -> SocketItem | None:
        """The next item, or None after ``timeout`` seconds."""
        try:
            return self._items.get(timeout=max(timeout, 0.0))
        except queue_module.Empty:
            return None

    def close(self) -> None:
        """Stop the thread (it ends soon; nothing waits for it)."""
        self._stop.set()
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended already
                loop.call_soon_threadsafe(self._close_conn)

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def _offer(self, item: SocketItem) -> bool:
        """Hand an item to the reader, waiting while the queue is full; False once closed."""
        while not self._stop.is_set():
            try:
                self._items.put(item, timeout=0.2)
                return True
            except queue_module.Full:
                continue
        return False

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except Exception as exc:  # never lose the reader: it is told and falls back
            self._offer(SocketFailed(ComputeQueueError(f"websocket {safe(self._url)}: {exc}")))
        finally:
            self._offer(SocketEnd())

    async def _run(self) -> None:
        from tornado.httpclient import HTTPClientError, HTTPRequest
        from tornado.iostream import StreamClosedError
        from tornado.websocket import WebSocketError, websocket_connect

        self._loop = asyncio.get_running_loop()
        failures = 0
        connected = False
        while not self._stop.is_set():
            request = HTTPRequest(
                self._url,
                headers=self._headers,
                connect_timeout=self._timeout,
                request_timeout=self._timeout,
            )
            try:
                conn = await websocket_connect(
                    request, ping_interval=15, max_message_size=64 * 1024 * 1024
                )
            except HTTPClientError as exc:
                if exc.code < 500 and exc.code not in (408, 429):  # refused: will not change
                    self._offer(SocketFailed(_ws_refusal(exc, self._url)))
                    return
                error: Exception = exc
            except (OSError, WebSocketError, StreamClosedError, asyncio.TimeoutError) as exc:
                error = exc
            else:
                failures = 0
                connected = True
                self.connections += 1
                if await self._serve(conn):
                    return
                continue
            failures += 1
            if failures > (self._retries if connected else 1):
                message = f"cannot open the websocket {safe(self._url)}: {error}"
                self._offer(SocketFailed(ComputeQueueError(message)))
                return
            for _ in range(int(min(0.25 * 2**failures, 4.0) / 0.05)):
                if self._stop.is_set():
                    return
                await asyncio.sleep(0.05)

    async def _serve(self, conn: Any) -> bool:
        """Read one connection; True when finished for good (closed, or the log is done)."""
        from tornado.iostream import StreamClosedError
        from tornado.websocket import WebSocketClosedError

        self._conn = conn
        try:
            if self._stop.is_set():
                return True
            if self._run_id is not None:
                subscribe = {"type": "subscribe", "runId": self._run_id, "since": self._since}
                await conn.write_message(json.dumps(subscribe))
            while True:
                raw = await conn.read_message()
                if raw is None:  # dropped: reconnect, unless we closed it
                    return self._stop.is_set()
                try:
                    message = json.loads(raw)
                except ValueError:
                    continue
                if not isinstance(message, dict):
                    continue
                ours = message.get("type") == "logs" and message.get("runId") == self._run_id
                if ours and isinstance(message.get("next"), int):
                    self._since = message["next"]
                if not self._offer(message):
                    return True
                if ours and message.get("done"):
                    return True
        except (WebSocketClosedError, StreamClosedError):
            return self._stop.is_set()
        finally:
            self._conn = None
            conn.close()


def _ws_refusal(exc: Any, url: str) -> ComputeQueueError:
    """The host's ``{"error"}`` of a refused websocket upgrade."""
    message = f"websocket {safe(url)} refused"
    response = getattr(exc, "response", None)
    raw = getattr(response, "body", None) if response is not None else None
    if raw:
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            data = json.loads(raw)
            if isinstance(data, dict) and isinstance(data.get("error"), str):
                message = data["error"]
    return ComputeQueueError(message, int(exc.code), safe(url))


class LogStream(Closing):
    """A run's log, live: an iterator of :class:`LogRecord` that ends when the run has finished
    and its whole log has been seen.

    ``next`` is the offset to resume from (the end of the last record returned). Records come
    over the queue's websocket; when it cannot be opened the stream polls the stored log
    (``GET …/logs?format=jsonl&since=``) every ``poll`` seconds. With ``timeout`` (seconds),
    :class:`JobTimeout` is raised if the stream has not ended by then.
    """

    def __init__(
        self, job: Followed, since: int = 0, timeout: float | None = None, poll: float = 1.0
    ) -> None:
        self.job = job
        self.next = since
        self._poll = poll
        self._timeout = timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._buffer: collections.deque[LogRecord] = collections.deque()
        self._done = False
        self._final = False  # polling: the run was seen finished; one more read, then done
        self._socket: QueueSocket | None = QueueSocket(job.client, job.queue, job.run_id, since)

    def __iter__(self) -> LogStream:
        return self

    def __next__(self) -> LogRecord:
        while True:
            if self._buffer:
                record = self._buffer.popleft()
                self.next = max(self.next, record.end)
                return record
            if self._done:
                self.close()
                raise StopIteration
            left = remaining(self._deadline)
            if left is not None and left <= 0:
                self.close()
                raise JobTimeout(
                    f"the log of job {self.job.job_id[:12]} did not end within {self._timeout} s"
                )
            if self._socket is not None:
                self._from_socket(1.0 if left is None else min(1.0, left))
            else:
                self._from_http(left)

    def text(self) -> Iterator[str]:
        """The log's text, record by record."""
        for record in self:
            yield record.d

    def _from_socket(self, wait: float) -> None:
        assert self._socket is not None
        item = self._socket.get(wait)
        if item is None:
            return
        if isinstance(item, (SocketFailed, SocketEnd)):
            log.debug("following the log without the websocket: %s", getattr(item, "error", ""))
            self._socket.close()
            self._socket = None  # poll from here on, from self.next
            return
        kind = item.get("type")
        if kind == "logs" and item.get("runId") == self.job.run_id:
            self._buffer.extend(record_from_json(r) for r in item.get("records") or [])
            if item.get("done"):
                self._done = True
        elif kind == "error":
            self.close()
            raise ComputeQueueError(str(item.get("error")))

    def _from_http(self, left: float | None) -> None:
        records = self.job.log_records(since=self.next)
        if records:
            self._buffer.extend(records)
            return
        if self._final:
            self._done = True
            return
        if self.job.refresh().finished:
            self._final = True  # the log is complete now: read what is left, then stop
            return
        time.sleep(self._poll if left is None else max(0.0, min(self._poll, left)))

    def close(self) -> None:
        """Stop following (the background thread ends soon)."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
