"""Following a ``%%container`` job in plain text: submit, stream the log, hint, cancel, outputs.

The log is read by a background thread into a queue, so the kernel's main thread stays free to
notice an interrupt at once (and cancel the job) and to say, after a while, that no worker
serves the queue. What is printed is capped (:data:`MAX_SHOWN_BYTES`): a notebook slows down
with megabytes of output, and the whole log stays one link away.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from datetime import timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ..client.errors import ComputeQueueError
from ..client.uploads import human_size
from ..model.log_records import LogRecord
from .live_log import read_log_into

if TYPE_CHECKING:
    from ..client.client import Client, Job
    from .widget import JobWidget

log = logging.getLogger("jupyter_compute_queue.magic")

#: Bytes of log a cell shows before it says where the rest is.
MAX_SHOWN_BYTES = 512 * 1024
#: Seconds a job may stay queued before the cell looks for workers and says what to do.
HINT_AFTER = 5.0
#: Seconds the magic waits for a front end to say it shows the widget before it prints the log
#: as text (nbconvert and front ends that cannot talk to a busy kernel never say so).
RENDER_WAIT = 2.0


class ContainerJobFailed(ComputeQueueError):
    """The job of a ``%%container`` cell did not succeed (``.job`` says how it ended)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        how = job.reason or job.state
        if job.reason == "Failed" and job.exit_code is not None:
            how = f"Failed with exit code {job.exit_code}"
        detail = f": {job.message}" if job.message else ""
        super().__init__(f"job {job.job_id[:12]} on queue {job.queue!r} {how}{detail}")

    def _render_traceback_(self) -> list[str]:
        # IPython shows this instead of a traceback through the client's internals.
        return [f"\x1b[31mContainerJobFailed\x1b[0m: {self}", f"full log: {self.job.url}logs"]


class _Printer:
    """Writes log records to the cell, up to the cap."""

    def __init__(self, job: Job, out: TextIO, err: TextIO) -> None:
        self.job = job
        self.out = out
        self.err = err
        self.shown = 0
        self.capped = False

    def write(self, record: LogRecord) -> None:
        if self.capped:
            return
        text = record.d
        left = MAX_SHOWN_BYTES - self.shown
        data = text.encode("utf-8")
        if len(data) > left:
            text = data[:left].decode("utf-8", "ignore")
            self.capped = True
        self.shown += len(text.encode("utf-8"))
        stream = self.err if record.s == "err" else self.out
        stream.write(text)
        stream.flush()
        if self.capped:
            self.out.write(
                f"\n[compute-queue: the log shown here stops at {human_size(MAX_SHOWN_BYTES)}; "
                f"the whole log: {self.job.url}logs]\n"
            )
            self.out.flush()


def _worker_hint(client: Client, job: Job) -> str | None:
    """What to do when a queued job's queue has no connected worker (None when it has one)."""
    try:
        status = client.status(job.queue)
    except ComputeQueueError:
        return None
    if any(w.get("connected") for w in status.get("workers") or []):
        return None
    return (
        f"[compute-queue: no worker serves queue {job.queue!r} yet; the job waits for one. "
        f"Start one with:  jupyter compute-queue worker {job.queue} --url {client.url} "
        f"--token <a token from `jupyter compute-queue queue token {job.queue}`>]\n"
    )


def follow(client: Client, job: Job, namespace: str, out: TextIO, err: TextIO) -> None:
    """Show the job's log until it ends; an interrupt cancels the job and is raised again."""
    printer = _Printer(job, out, err)
    records: queue.Queue[Any] = queue.Queue()
    stop = threading.Event()
    thread = threading.Thread(
        target=read_log_into, args=(job, records, stop), name="compute-queue-cell", daemon=True
    )
    thread.start()
    started = time.monotonic()
    hinted = job.cached
    try:
        while True:
            try:
                item = records.get(timeout=0.5)
            except queue.Empty:
                if not hinted and time.monotonic() - started > HINT_AFTER:
                    hinted = True
                    if job.refresh().state == "Queued" and (hint := _worker_hint(client, job)):
                        out.write(hint)
                        out.flush()
                continue
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            printer.write(item)
    except KeyboardInterrupt:
        stop.set()
        answer = job.cancel(namespace=namespace)
        out.write(f"\n[compute-queue: interrupted: {answer.get('message') or 'cancelled'}]\n")
        out.flush()
        raise


def _same_file(path: Path, size: int, key: str) -> bool:
    if not path.is_file() or path.stat().st_size != size:
        return False
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest() == key


def fetch_outputs(job: Job, folder: Path, out: TextIO) -> None:
    """Download the outputs into ``folder``, skipping files already there and identical (a
    cached result re-run)."""
    outputs = job.outputs
    if not outputs:
        return
    wanted = [
        path
        for path, meta in outputs.items()
        if not _same_file(folder.joinpath(*path.split("/")), int(meta["size"]), str(meta["key"]))
    ]
    total = sum(int(m["size"]) for m in outputs.values())
    if wanted:
        job.download(folder, wanted)
    out.write(
        f"[compute-queue: {len(outputs)} output file(s), {human_size(total)}, in {folder}/]\n"
    )
    out.flush()


def show_widget(job: Job, namespace: str, shell: Any) -> JobWidget | None:
    """Display the job widget, unless ``$COMPUTE_QUEUE_DISPLAY`` is ``text``, this is no
    kernel, or the widget cannot be made (anywidget missing, assets not built)."""
    mode = os.environ.get("COMPUTE_QUEUE_DISPLAY", "auto").lower()
    if mode == "text" or shell is None or getattr(shell, "kernel", None) is None:
        return None
    try:
        from IPython.display import display

        from .widget import JobWidget

        widget = JobWidget(job, namespace=namespace)
    except (ImportError, ComputeQueueError) as exc:
        if mode == "widget":
            raise
        log.debug("plain text instead of the job widget: %s", exc)
        return None
    display(widget)  # type: ignore[no-untyped-call]
    return widget


def wait_widget(widget: JobWidget, namespace: str, out: TextIO) -> Job:
    """Block until the widget's job has finished; an interrupt cancels it, as in text mode."""
    try:
        return widget.wait()
    except KeyboardInterrupt:
        job = widget.job
        if job is not None:
            answer = job.cancel(namespace=namespace)
            out.write(f"[compute-queue: interrupted: {answer.get('message') or 'cancelled'}]\n")
            out.flush()
        raise


def run_cell(
    client: Client,
    args: argparse.Namespace,
    definition: dict[str, Any],
    files: dict[str, Any],
    namespace: str,
    on_submit: Callable[[Job], None] | None = None,
    shell: Any = None,
    secrets: dict[str, str] | None = None,
) -> Job:
    """Submit the cell's job and, unless ``--no-wait``, follow it to its end: in the job
    widget when a front end shows it (it says so within :data:`RENDER_WAIT` seconds), else in
    plain text. ``on_submit`` gets the job at once (``--out``: the variable is set even if
    the cell is interrupted or raises)."""
    out, err = sys.stdout, sys.stderr
    job = client.submit(
        definition,
        queue=args.queue,
        namespace=namespace,
        rerun=args.rerun,
        files=files,
        secrets=secrets,
    )
    if on_submit is not None:
        on_submit(job)
    widget = show_widget(job, namespace, shell)
    short = job.job_id[:12]
    if job.cached:
        record = job.refresh().record
        when = record.finished_at if record is not None else None
        stamp = when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if when else "?"
        out.write(f"[compute-queue: cached result from {stamp}: job {short} {job.page_url}]\n")
    elif widget is None:
        out.write(f"[compute-queue: job {short} {job.state.lower()} on {job.queue!r}: ")
        out.write(f"{job.page_url}]\n")
    out.flush()
    if args.no_wait:
        return job
    if widget is not None and widget.rendered.wait(RENDER_WAIT):
        job = wait_widget(widget, namespace, out)
    else:
        follow(client, job, namespace, out, err)
    job.refresh()
    if job.succeeded:
        folder = Path(args.outputs) if args.outputs else Path("outputs") / short
        fetch_outputs(job, folder, out)
    elif not job.finished:  # the log ended but the record lags: wait for it
        job.wait(timeout=30)
    if not job.succeeded and not args.no_raise:
        raise ContainerJobFailed(job)
    return job
