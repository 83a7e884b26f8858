"""The job widget (anywidget): a job's state, live log, outputs and actions, through the kernel.

The front end is ``static/widget.js`` (built from ``labextension/src/widget.ts``); its
``KernelJobSource`` is the other end of this contract (docs/frontend.md):

* **traits** (kernel → front end): the run's ``job_id run_id queue state phase reason
  exit_code message outputs queued_at started_at finished_at cached``, its ``job_url`` and
  ``page_url``, the ``definition``, the ``mode`` (``job`` or ``editor``) and ``error``.
* **custom messages** front end → kernel, each answered first by ``{"type": "ack", "of"}``
  so the front end can tell a kernel that is busy (a blocked cell whose front end cannot
  send comms on a subshell) and say to interrupt it instead:
  ``{"type": "logs", "since"}`` (replay), ``cancel``, ``rerun``,
  ``{"type": "submit", "definition", "queue", "files": [names]}`` with one buffer per file,
  ``{"type": "read", "id", "path", "max"}`` and ``{"type": "zip", "id"}`` (bytes of an output or
  of all of them, for previews and downloads when the host is not the page's own server),
  ``rendered``.
* kernel → front end: ``{"type": "logs", "offset", "records"}`` (log deltas with their offsets,
  never a growing trait) and ``{"type": "file", "id", "path", "size" | "error"}`` with the bytes
  as a buffer.

Two daemon threads follow a job: one waits on its state (the queue websocket, through
``Job.wait`` and ``Job.on_change``), one moves its log into a bounded in-memory buffer (for
replays when a view is re-rendered) and on to the front end in batches.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anywidget
import traitlets

from .errors import ComputeQueueError
from .logs import LogRecord

if TYPE_CHECKING:
    from .client import Client
    from .job import Job

log = logging.getLogger("jupyter_compute_queue.widget")

BUNDLE = Path(__file__).parent / "static" / "widget.js"
#: Log bytes a widget keeps in memory for replays; older parts are read from the host again.
BUFFER_BYTES = 8 * 1024 * 1024
#: Largest log message: a replay of a long log goes in several.
MESSAGE_BYTES = 256 * 1024
#: How long the log thread gathers records into one message (seconds).
BATCH_SECONDS = 0.05
#: Largest output sent through the kernel (previews and downloads from another host).
READ_MAX = 64 * 1024 * 1024


def _bundle() -> Path:
    if not BUNDLE.is_file():
        raise ComputeQueueError(
            f"the job widget's front end is missing ({BUNDLE}): the package was installed "
            "without its built assets; reinstall it, or build them with `npm run build` in "
            "labextension/"
        )
    return BUNDLE


def _size(record: LogRecord) -> int:
    return len(record.d.encode("utf-8"))


def _wire(record: LogRecord) -> dict[str, Any]:
    return {"o": record.o, "t": record.t, "s": record.s, "d": record.d}


class JobWidget(anywidget.AnyWidget):
    """A job's view (``JobWidget(job)``) or an editor that submits one (``JobWidget(client=…,
    definition=…)``)."""

    _esm = BUNDLE  # anywidget reads the file when the class is made

    mode = traitlets.Unicode("job").tag(sync=True)
    job_id = traitlets.Unicode(None, allow_none=True).tag(sync=True)
    run_id = traitlets.Unicode(None, allow_none=True).tag(sync=True)
    queue = traitlets.Unicode("local").tag(sync=True)
    state = traitlets.Unicode(None, allow_none=True).tag(sync=True)
    phase = traitlets.Unicode(None, allow_none=True).tag(sync=True)
    reason = traitlets.Unicode(None, allow_none=True).tag(sync=True)
    exit_code = traitlets.Int(None, allow_none=True).tag(sync=True)
    message = traitlets.Unicode(None, allow_none=True).tag(sync=True)
    outputs = traitlets.Dict().tag(sync=True)
    queued_at = traitlets.Unicode(None, allow_none=True).tag(sync=True)
    started_at = traitlets.Unicode(None, allow_none=True).tag(sync=True)
    finished_at = traitlets.Unicode(None, allow_none=True).tag(sync=True)
    cached = traitlets.Bool(False).tag(sync=True)
    job_url = traitlets.Unicode(None, allow_none=True).tag(sync=True)
    page_url = traitlets.Unicode(None, allow_none=True).tag(sync=True)
    definition = traitlets.Dict().tag(sync=True)
    error = traitlets.Unicode("").tag(sync=True)

    def __init__(
        self,
        job: Job | None = None,
        *,
        client: Client | None = None,
        definition: dict[str, Any] | None = None,
        queue: str | None = None,
        namespace: str | None = None,
    ) -> None:
        _bundle()  # a clear error when the package was installed without its assets
        super().__init__()
        if job is None and client is None:
            from .client import Client

            client = Client(queue=queue or "local")
        self.client: Client = job.client if job is not None else client  # type: ignore[assignment]
        self.namespace = namespace
        self.job: Job | None = None
        self.finished = threading.Event()  # the current job has finished (or failed to)
        self.rendered = threading.Event()  # a front end has shown the widget and can talk to us
        self.failure: BaseException | None = None
        self._lock = threading.Lock()
        self._records: list[LogRecord] = []
        self._buffered = 0
        self._stop = threading.Event()
        self._remove_listener: Any = None
        self.on_msg(self._received)
        if definition is not None:
            self.definition = dict(definition)
        if job is None:
            self.mode = "editor"
            self.queue = queue or self.client.queue
        else:
            self.follow(job)

    # --- following a job ------------------------------------------------------------------------

    def follow(self, job: Job) -> None:
        """Show ``job`` from now on (its log from the start), in place of any earlier one."""
        self._stop.set()
        if self._remove_listener is not None:
            self._remove_listener()
        stop = self._stop = threading.Event()
        with self._lock:
            self.job = job
            self._records = []
            self._buffered = 0
        self.finished.clear()
        self.failure = None
        self.mode = "job"
        self._show(job)
        self._remove_listener = job.on_change(self._show)
        for target, name in ((self._follow_state, "state"), (self._follow_log, "log")):
            threading.Thread(
                target=target, args=(job, stop), name=f"compute-queue-widget-{name}", daemon=True
            ).start()

    def _show(self, job: Job) -> None:
        if job is not self.job:
            return
        record = job.record
        stamp = (lambda t: t.isoformat().replace("+00:00", "Z") if t else None) if record else None
        with self.hold_sync():
            self.job_id, self.run_id, self.queue = job.job_id, job.run_id, job.queue
            self.state, self.cached = job.state, job.cached
            self.job_url, self.page_url = job.url, job.page_url
            if record is not None and stamp is not None:
                self.phase = record.phase.value if record.phase else None
                self.reason = record.reason.value if record.reason else None
                self.exit_code, self.message = record.exit_code, record.message
                self.outputs = {
                    p: {"key": o.key, "size": o.size} for p, o in record.outputs.items()
                }
                self.queued_at = stamp(record.queued_at)
                self.started_at = stamp(record.started_at)
                self.finished_at = stamp(record.finished_at)

    def _follow_state(self, job: Job, stop: threading.Event) -> None:
        try:
            if not self.definition:
                self.definition = job.definition()
            while not stop.is_set():
                with contextlib.suppress(ComputeQueueError):  # a timeout: look again
                    job.wait(timeout=30)
                if job.finished:
                    break
        except BaseException as exc:  # the host went away, the job was forgotten …
            self.failure = exc
            self.error = str(exc)
        finally:
            if job is self.job:
                self.finished.set()

    def _follow_log(self, job: Job, stop: threading.Event) -> None:
        from .cell_follow import read_log_into

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
        self.send({"type": "logs", "offset": records[0].o, "records": [_wire(r) for r in records]})

    def _replay(self, since: int) -> None:
        with self._lock:
            job, records = self.job, list(self._records)
        if job is None:
            return
        if not records or records[0].o > since:  # older than the buffer: ask the host
            try:
                records = job.log_records(since=since)
            except ComputeQueueError as exc:
                self.error = f"could not read the log: {exc}"
                return
        records = [r for r in records if r.end > since]
        while records:
            chunk: list[LogRecord] = []
            size = 0
            while records and (not chunk or size + _size(records[0]) <= MESSAGE_BYTES):
                size += _size(records[0])
                chunk.append(records.pop(0))
            self.send({"type": "logs", "offset": chunk[0].o, "records": [_wire(r) for r in chunk]})

    # --- the front end's requests ---------------------------------------------------------------

    def _received(self, _widget: Any, content: Any, buffers: list[bytes] | None = None) -> None:
        if not isinstance(content, dict):
            return
        kind = content.get("type")
        self.send({"type": "ack", "of": kind})
        try:
            if kind == "rendered":
                self.rendered.set()
            elif kind == "logs":
                self._replay(int(content.get("since") or 0))
            elif kind == "cancel" and self.job is not None:
                self.job.cancel()
            elif kind == "rerun" and self.job is not None:
                definition = self.job.definition()
                self.follow(
                    self.client.submit(
                        definition, queue=self.job.queue, namespace=self.namespace, rerun=True
                    )
                )
            elif kind == "submit":
                self._submit(content, buffers or [])
            elif kind in ("read", "zip"):
                self._read(content)
        except (ComputeQueueError, ValueError, OSError) as exc:
            self.error = str(exc)

    def _submit(self, content: dict[str, Any], buffers: list[bytes]) -> None:
        definition = content.get("definition")
        if not isinstance(definition, dict):
            raise ValueError("the editor sent no definition")
        names = content.get("files") or []
        if len(names) != len(buffers):
            raise ValueError(f"the editor sent {len(buffers)} file(s) for {len(names)} name(s)")
        files = {str(name): bytes(data) for name, data in zip(names, buffers, strict=True)}
        queue_name = str(content.get("queue") or self.queue or "local")
        self.error = ""
        self.definition = definition
        self.follow(
            self.client.submit(
                definition, queue=queue_name, namespace=self.namespace, files=files or None
            )
        )

    def _read(self, content: dict[str, Any]) -> None:
        request = content.get("id")
        job = self.job
        try:
            if job is None:
                raise ComputeQueueError("there is no job yet")
            if content["type"] == "zip":
                path, data = "outputs.zip", _zip_bytes(job)
            else:
                path = str(content.get("path"))
                data = job.read_output(path, min(int(content.get("max") or READ_MAX), READ_MAX))
        except (ComputeQueueError, ValueError, KeyError) as exc:
            self.send({"type": "file", "id": request, "error": str(exc)})
            return
        self.send({"type": "file", "id": request, "path": path, "size": len(data)}, [data])

    # --- the magic's side -----------------------------------------------------------------------

    def __repr__(self) -> str:
        # Also the text/plain of the widget's display: what a front end without widgets
        # (nbconvert, a saved notebook) shows instead.
        job = self.job
        if job is None:
            return f"<job editor for queue {self.queue!r}>"
        return f"<job {job.job_id[:12]} on {job.queue!r}: {job.page_url}>"

    def wait(self) -> Job:
        """Block until the current job has finished; an interrupt is raised at once. The job
        may change meanwhile (Rerun): the one that finished is returned."""
        while not self.finished.wait(0.25):
            pass
        if self.failure is not None:
            raise self.failure
        assert self.job is not None
        return self.job

    def close(self) -> None:
        self._stop.set()
        super().close()


def _zip_bytes(job: Job) -> bytes:
    with job.client._request("GET", job._path + "outputs.zip", query=job._run_query) as reply:
        if reply.status != 200:
            raise reply.error("GET")
        data: bytes = reply.read(READ_MAX + 1)
    if len(data) > READ_MAX:
        raise ValueError(f"the outputs are over {READ_MAX} bytes as a zip: download them")
    return data
