"""The job widget's data source in the kernel: the job's log, moved from the host to the front
end in batches and kept in a bounded buffer for replays, and output bytes read for previews and
downloads.

:class:`~jupyter_compute_queue.widget.JobWidget` inherits it; the messages it sends are part of
the contract in that module's docstring (``logs`` and ``file``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from ..client.errors import ComputeQueueError
from ..model.log_records import LogRecord
from .live_log import read_log_into

if TYPE_CHECKING:
    from ..client.client import Job

log = logging.getLogger("jupyter_compute_queue.widget")  # one logger for the whole widget

#: Log bytes a widget keeps in memory for replays; older parts are read from the host again.
BUFFER_BYTES = 8 * 1024 * 1024
#: Largest log message: a replay of a long log goes in several.
MESSAGE_BYTES = 256 * 1024
#: How long the log thread gathers records into one message (seconds).
BATCH_SECONDS = 0.05
#: Largest output sent through the kernel (previews and downloads from another host).
READ_MAX = 64 * 1024 * 1024


def _size(record: LogRecord) -> int:
    return len(record.d.encode("utf-8"))


def _wire(record: LogRecord) -> dict[str, Any]:
    return {"o": record.o, "t": record.t, "s": record.s, "d": record.d}


class DataSource:
    """The log pump and the output reads of the widget (mixed into it)."""

    # Defined by the widget: the job it shows, its last failure (a trait), the lock over its
    # state, the log buffer it resets when it follows another job, and its comm's send.
    job: Job | None
    error: str
    _lock: threading.Lock
    _records: list[LogRecord]
    _buffered: int
    send: Callable[..., None]

    def _follow_log(self, job: Job, stop: threading.Event) -> None:
        into: queue.Queue[Any] = queue.Queue()
        threading.Thread(
            target=read_log_into,
            args=(job, into, stop),
            name="compute-queue-widget-read",
            daemon=True,
        ).start()
        batch: list[LogRecord] = []
        deadline = 0.0
        while not stop.is_set():
            try:
                item = into.get(timeout=BATCH_SECONDS)
            except queue.Empty:
                item = False
            if isinstance(item, LogRecord):
                if not batch:
                    deadline = time.monotonic() + BATCH_SECONDS
                batch.append(item)
                if time.monotonic() < deadline and sum(map(_size, batch)) < MESSAGE_BYTES:
                    continue
            if batch:
                self._keep(job, batch)
                batch = []
            if item is None or isinstance(item, BaseException):
                if isinstance(item, BaseException):
                    log.warning("the widget stopped following the log: %s", item)
                return

    def _keep(self, job: Job, records: list[LogRecord]) -> None:
        """Buffer records for replays (dropping the oldest past the cap) and send them."""
        with self._lock:
            if job is not self.job:
                return
            self._records.extend(records)
            self._buffered += sum(map(_size, records))
            while self._buffered > BUFFER_BYTES and len(self._records) > 1:
                self._buffered -= _size(self._records.pop(0))
            self._send_logs(job, records)

    def _send_logs(self, job: Job, records: list[LogRecord]) -> None:
        self.send(
            {
                "type": "logs",
                "run": job.run_id,
                "offset": records[0].o,
                "records": [_wire(r) for r in records],
            }
        )

    def _replay(self, since: int) -> None:
        with self._lock:
            job, records = self.job, list(self._records)
            if job is None:
                return
            if records and records[0].o <= since:
                # Sent under the lock: no live batch can come between the buffer and it.
                self._send_chunks(job, [r for r in records if r.end > since])
                return
        try:  # older than the buffer: ask the host (a live batch may overtake it; the front
            # end waits for the gap to be filled)
            records = job.log_records(since=since)
        except ComputeQueueError as exc:
            self.error = f"could not read the log: {exc}"
            return
        self._send_chunks(job, [r for r in records if r.end > since])

    def _send_chunks(self, job: Job, records: list[LogRecord]) -> None:
        """Send records in messages of at most about MESSAGE_BYTES."""
        while records:
            chunk: list[LogRecord] = []
            size = 0
            while records and (not chunk or size + _size(records[0]) <= MESSAGE_BYTES):
                size += _size(records[0])
                chunk.append(records.pop(0))
            self._send_logs(job, chunk)

    def _read(self, content: dict[str, Any]) -> None:
        request = content.get("id")
        job = self.job
        try:
            limit = min(int(content.get("max") or READ_MAX), READ_MAX)
            if job is None:
                raise ComputeQueueError("there is no job yet")
            if content["type"] == "zip":
                path, data = "outputs.zip", _zip_bytes(job, limit)
            else:
                path = str(content.get("path"))
                data = _read_head(job, path, limit)
        except (ComputeQueueError, ValueError, KeyError, OSError) as exc:
            self.send({"type": "file", "id": request, "error": str(exc)})
            return
        self.send({"type": "file", "id": request, "path": path, "size": len(data)}, [data])


def _read_head(job: Job, path: str, limit: int) -> bytes:
    """The first ``limit`` bytes of an output of the job's finished run."""
    outputs = job.outputs
    if not job.finished:
        raise ComputeQueueError(f"job {job.job_id[:12]} has not finished")
    if path not in outputs:
        raise ComputeQueueError(f"job {job.job_id[:12]} has no output {path!r}", 404)
    url = job._path + "outputs/" + quote(path, safe="/")
    with job.client._request("GET", url, query=job._run_query) as reply:
        if reply.status != 200:
            raise reply.error("GET")
        return reply.read(limit)


def _zip_bytes(job: Job, limit: int) -> bytes:
    with job.client._request("GET", job._path + "outputs.zip", query=job._run_query) as reply:
        if reply.status != 200:
            raise reply.error("GET")
        data: bytes = reply.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"the outputs are over {limit} bytes as a zip: download them")
    return data
