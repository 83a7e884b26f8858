"""The job widget (anywidget): a job's state, live log, outputs and actions, through the kernel.

The front end is ``static/widget.js`` (built from ``labextension/src/widget.ts``); its
``KernelJobSource`` is the other end of this contract (docs/frontend.md):

* **traits** (kernel → front end): the run's ``job_id run_id queue state phase reason
  exit_code message outputs queued_at started_at finished_at cached``, its ``job_url`` (for
  direct download links) and ``page_url`` (the job page), the ``definition`` (what the editor
  starts from: the host's stored definition of the job), the ``mode`` (``job``, or ``editor``
  before a job is submitted) and ``error`` (the last failure, e.g. the host refusing a
  definition: its message names the field).
* **custom messages** front end → kernel. Each carries an ``id`` and is answered first by
  ``{"type": "ack", "of": type, "id": id}``, so the front end can tell a kernel that is busy
  (a blocked cell whose front end cannot send comms on a subshell) and say to interrupt it.
  The front end sends an unacknowledged request again (its first messages can leave before
  its comm subshell exists); an id already handled is only acknowledged:

  - ``{"type": "logs", "id", "since"}``: replay the log from byte ``since`` (a view opening,
    or a gap it noticed);
  - ``{"type": "cancel", "id"}``, ``{"type": "rerun", "id"}``,
    ``{"type": "submit", "id", "definition", "queue", "files": [names]}`` with one buffer per
    file (the editor's uploads, put under ``/inputs/<name>``): each answered, once done, by
    ``{"type": "done", "of", "id"}`` with ``"error"`` when it failed (also set as ``error``);
  - ``{"type": "read", "id", "path", "max"}``: the first ``max`` bytes of an output (all of
    it when smaller; previews and downloads when the host is not the page's own server);
    ``{"type": "zip", "id", "max"}``: all outputs as a zip, refused over ``max`` bytes;
    answered by ``{"type": "file", "id", "path", "size"}`` with the bytes as one buffer, or
    ``{"type": "file", "id", "error"}``;
  - ``{"type": "rendered", "id"}``: a view is shown (the ``%%container`` magic falls back to
    plain text when no front end says so within a few seconds).
* kernel → front end: ``{"type": "logs", "run", "offset", "records"}``: log deltas with their
  offsets, never a growing trait.

The widget's comm keeps the front end's messages on the subshell they were sent on (see
:func:`_answer_on_the_senders_subshell`): that is what lets Cancel reach the kernel while the
magic's cell blocks.

Two daemon threads follow a job: one waits on its state (the queue websocket, through
``Job.wait`` and ``Job.on_change``), one moves its log into a bounded in-memory buffer (for
replays when a view is re-rendered) and on to the front end in batches. Reads of outputs run
in threads of their own, so a large one does not hold up a Cancel. The log and the reads are in
:mod:`~jupyter_compute_queue.notebook.widget_data`; here are the traits, the requests and the
actions.

``JobWidget(job)`` shows a job; :func:`editor` (or ``JobWidget.editor``) opens the editor.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anywidget
import traitlets

from ..client.errors import ComputeQueueError
from ..model.log_records import LogRecord
from .widget_data import DataSource

if TYPE_CHECKING:
    from ..client.client import Client, Job
    from ..client.job import JobBase

__all__ = ["JobWidget", "editor"]

log = logging.getLogger("jupyter_compute_queue.widget")

BUNDLE = Path(__file__).parent / "static" / "widget.js"
#: Request ids remembered, so that a copy of a request is handled once.
HANDLED_IDS = 1024


def _bundle() -> Path:
    if not BUNDLE.is_file():
        raise ComputeQueueError(
            f"the job widget's front end is missing ({BUNDLE}): the package was installed "
            "without its built assets; reinstall it, or build them with `npm run build` in "
            "labextension/"
        )
    return BUNDLE


class JobWidget(anywidget.AnyWidget, DataSource):
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
        # The mode is set before the widget opens: a view never flashes the other one.
        super().__init__(mode="editor" if job is None else "job")
        if job is None and client is None:
            from ..client.client import Client

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
        self._handled: OrderedDict[str, None] = OrderedDict()
        self.on_msg(self._received)
        _answer_on_the_senders_subshell(self)
        if definition is not None:
            self.definition = dict(definition)
        if job is None:
            self.queue = queue or self.client.queue
        else:
            self.follow(job)

    @classmethod
    def editor(
        cls,
        queue: str | None = None,
        image: str | None = None,
        command: str | list[str] | None = None,
        *,
        definition: dict[str, Any] | None = None,
        client: Client | None = None,
        namespace: str | None = None,
    ) -> JobWidget:
        """An editor to compose and submit a job, prefilled with ``definition`` and/or
        ``image`` and ``command``; it shows the job once submitted. The queue defaults to the
        client's (``local``)."""
        prefill = dict(definition or {})
        if image is not None:
            prefill["image"] = image
        if command is not None:
            prefill["command"] = command
        if client is None:
            from ..client.client import Client

            client = Client(queue=queue or "local")
        return cls(client=client, definition=prefill, queue=queue, namespace=namespace)

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

    def _show(self, job: JobBase) -> None:
        if job is not self.job:
            return
        record = job.record
        with self.hold_sync():
            self.job_id, self.run_id, self.queue = job.job_id, job.run_id, job.queue
            self.state, self.cached = job.state, job.cached
            self.job_url, self.page_url = job.url, job.page_url
            # Without a record yet (just submitted), nothing of an earlier run stays shown.
            self.phase = record.phase.value if record and record.phase else None
            self.reason = record.reason.value if record and record.reason else None
            self.exit_code = record.exit_code if record else None
            self.message = record.message if record else None
            self.outputs = (
                {p: {"key": o.key, "size": o.size} for p, o in record.outputs.items()}
                if record
                else {}
            )
            self.queued_at = _stamp(record.queued_at if record else None)
            self.started_at = _stamp(record.started_at if record else None)
            self.finished_at = _stamp(record.finished_at if record else None)

    def _follow_state(self, job: Job, stop: threading.Event) -> None:
        if not self.definition:  # what the editor (Edit) starts from; not needed to follow
            try:
                self.definition = job.definition()
            except ComputeQueueError as exc:
                log.debug("no definition for the widget's editor: %s", exc)
        try:
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

    # --- the front end's requests ---------------------------------------------------------------

    def _received(self, _widget: Any, content: Any, buffers: list[bytes] | None = None) -> None:
        if not isinstance(content, dict):
            return
        kind = content.get("type")
        request = content.get("id")
        self.send({"type": "ack", "of": kind, "id": request})
        if not self._first(request):
            return  # a copy the front end sent while it waited for the ack
        if kind == "rendered":
            self.rendered.set()
        elif kind == "logs":
            self._replay(int(content.get("since") or 0))
        elif kind in ("cancel", "rerun", "submit"):
            self._act(str(kind), request, content, buffers or [])
        elif kind in ("read", "zip"):
            threading.Thread(
                target=self._read, args=(content,), name="compute-queue-widget-file", daemon=True
            ).start()

    def _first(self, request: Any) -> bool:
        """Whether this request id is new (requests without an id always are)."""
        if not isinstance(request, str):
            return True
        with self._lock:
            if request in self._handled:
                return False
            self._handled[request] = None
            while len(self._handled) > HANDLED_IDS:
                self._handled.popitem(last=False)
            return True

    def _act(self, kind: str, request: Any, content: dict[str, Any], buffers: list[bytes]) -> None:
        """Cancel, rerun or submit; answers ``done`` (with the error when it failed)."""
        try:
            if kind == "submit":
                self.error = ""
                self._submit(content, buffers)
            elif self.job is None:
                raise ValueError(f"there is no job to {kind} yet")
            elif kind == "cancel":
                self.job.cancel()  # no namespace: a person pressing Cancel cancels the run
            else:
                definition = self.job.definition()
                self.follow(
                    self.client.submit(
                        definition, queue=self.job.queue, namespace=self.namespace, rerun=True
                    )
                )
        except (ComputeQueueError, ValueError, OSError) as exc:
            self.error = str(exc)
            self.send({"type": "done", "of": kind, "id": request, "error": str(exc)})
        else:
            self.send({"type": "done", "of": kind, "id": request})

    def _submit(self, content: dict[str, Any], buffers: list[bytes]) -> None:
        definition = content.get("definition")
        if not isinstance(definition, dict):
            raise ValueError("the editor sent no definition")
        names = content.get("files") or []
        if not isinstance(names, list) or len(names) != len(buffers):
            raise ValueError(f"the editor sent {len(buffers)} file(s) for {len(names)} name(s)")
        files = {str(name): bytes(data) for name, data in zip(names, buffers, strict=True)}
        queue_name = str(content.get("queue") or self.queue or "local")
        job = self.client.submit(
            definition, queue=queue_name, namespace=self.namespace, files=files or None
        )
        self.definition = {}  # the host's (with the uploaded inputs) replaces it: _follow_state
        self.follow(job)

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
        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None
        super().close()


def _answer_on_the_senders_subshell(widget: JobWidget) -> None:
    """Let the front end's messages reach the kernel on the subshell it sent them on.

    JupyterLab ≥ 4.4 sends comm messages on a kernel subshell (ipykernel 7), so the kernel
    reads them while a cell blocks (the ``%%container`` magic waits for its job): that is how
    Cancel works during the cell. But ipykernel 7.4 routes a comm's incoming messages to the
    (sub)shell that last *sent* on the comm, for widgets that await a reply inside a cell. This
    widget sends from the cell's threads (the main shell), which would queue every message
    behind the blocked cell. It never awaits a reply in a cell, so it keeps the sender's own
    subshell (``default``). Kernels without that routing are left as they are.
    """
    comm = getattr(widget, "comm", None)
    if comm is not None and callable(getattr(comm, "_reply_subshell_for", None)):
        comm._reply_subshell_for = lambda _data, default: default


def editor(
    queue: str | None = None,
    image: str | None = None,
    command: str | list[str] | None = None,
    *,
    definition: dict[str, Any] | None = None,
    client: Client | None = None,
    namespace: str | None = None,
) -> JobWidget:
    """A job editor widget (see :meth:`JobWidget.editor`): display it, fill it in, Submit."""
    return JobWidget.editor(
        queue, image, command, definition=definition, client=client, namespace=namespace
    )


def _stamp(moment: datetime | None) -> str | None:
    """A time as the wire has it: ISO 8601 UTC with a ``Z``."""
    return moment.isoformat().replace("+00:00", "Z") if moment is not None else None
