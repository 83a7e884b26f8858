"""A job as the client sees it: its run record, waiting, logs, cancelling, outputs."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

from pydantic import ValidationError
from typing_extensions import Self

from ..model.job_fields import check_path
from ..model.log_records import LogRecord
from ..model.runs import RunRecord
from .errors import ComputeQueueError, JobTimeout
from .http import CHUNK, HttpClient
from .logstream import LogStream, QueueSocket, SocketEnd, SocketFailed, record_from_json, remaining
from .uploads import ProgressCallback

log = logging.getLogger("jupyter_compute_queue.client")

#: Default limit of :meth:`Job.read_output` (use :meth:`Job.download` for larger files).
READ_LIMIT = 64 * 1024 * 1024
#: While waiting on the websocket, the record is also fetched over REST this often (seconds),
#: in case an event was missed.
RECHECK_SECONDS = 30.0


class JobBase:
    """One run of a job in a queue, as seen by the client, over its host connection.

    :class:`~jupyter_compute_queue.client.Job` is this with the ways to find a job
    (:meth:`~jupyter_compute_queue.client.Job.attach`); the two are apart so that this module
    needs only the HTTP layer, not the :class:`~jupyter_compute_queue.client.Client` that makes
    Jobs.

    From the submission's answer: ``job_id``, ``run_id``, ``queue``, ``cached`` and ``url`` (the
    job in its queue). From the run record (``record``, fetched by :meth:`refresh`, kept up to
    date by :meth:`wait`): ``state``, ``phase``, ``reason``, ``exit_code``, ``message``,
    ``outputs``. Safe to share between threads.
    """

    def __init__(
        self,
        client: HttpClient,
        job_id: str,
        run_id: str,
        queue: str,
        *,
        url: str | None = None,
        cached: bool = False,
        state: str = "Queued",
        record: RunRecord | None = None,
        namespace: str | None = None,
    ) -> None:
        self.client = client
        self.job_id = job_id
        self.run_id = run_id
        self.queue = queue
        self.cached = cached
        self.namespace = namespace
        self.url = url or f"{client.api_url}{self._path}"
        self._state = state
        self._record = record
        self._lock = threading.Lock()
        self._listeners: list[Callable[[JobBase], None]] = []

    @classmethod
    def _from_answer(cls, client: HttpClient, answer: Any, namespace: str | None) -> Self:
        if not isinstance(answer, dict) or not {"jobId", "runId", "queue"} <= set(answer):
            raise ComputeQueueError(
                f"the host's answer to a submission is not understood: {answer}"
            )
        return cls(
            client,
            answer["jobId"],
            answer["runId"],
            answer["queue"],
            url=answer.get("url"),
            cached=bool(answer.get("cached")),
            state=str(answer.get("state", "Queued")),
            namespace=namespace,
        )

    def __repr__(self) -> str:
        reason = f" {self.reason}" if self.reason else ""
        return f"<Job {self.job_id[:12]} queue={self.queue!r} {self.state}{reason}>"

    # --- the record -----------------------------------------------------------------------------

    @property
    def _path(self) -> str:
        return f"q/{quote(self.queue, safe='')}/j/{self.job_id}/"

    @property
    def record(self) -> RunRecord | None:
        """The latest run record seen (None until the first :meth:`refresh` after a submit)."""
        with self._lock:
            return self._record

    def _update(self, data: Mapping[str, Any] | RunRecord) -> None:
        try:
            record = data if isinstance(data, RunRecord) else RunRecord.model_validate(data)
        except ValidationError:
            return
        if record.run_id != self.run_id:
            return
        with self._lock:
            current = self._record
            if current is not None and current.finished and not record.finished:
                return  # an older answer that arrived late (a run never leaves Finished)
            self._record = record
            self._state = record.state.value
            listeners = list(self._listeners) if record != current else []
        for listener in listeners:  # outside the lock: a listener may read the job
            try:
                listener(self)
            except Exception:  # one bad listener must not stop wait() or the others
                log.exception("a Job.on_change listener failed")

    def on_change(self, listener: Callable[[JobBase], None]) -> Callable[[], None]:
        """Call ``listener(job)`` whenever the run record changes (from :meth:`refresh`,
        :meth:`wait` or :meth:`cancel`, in the thread that saw the change); returns a function
        that removes it."""
        with self._lock:
            self._listeners.append(listener)

        def remove() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return remove

    def refresh(self) -> Self:
        """Fetch the run's record (``result.json`` of this run); returns the job."""
        self._update(self.client._json("GET", self._path + "result.json", query=self._run_query))
        return self

    @property
    def _run_query(self) -> dict[str, str]:
        return {"run": self.run_id}

    @property
    def state(self) -> str:
        """``Queued``, ``Running`` or ``Finished``."""
        with self._lock:
            return self._state

    @property
    def phase(self) -> str | None:
        """What a running run is doing (``pulling``, ``running``, ``uploading`` …)."""
        record = self.record
        return record.phase.value if record and record.phase else None

    @property
    def reason(self) -> str | None:
        """Why the run finished (``Success``, ``Failed``, ``Cancelled`` …); None before."""
        record = self.record
        return record.reason.value if record and record.reason else None

    @property
    def exit_code(self) -> int | None:
        """The container's exit code, once it has exited."""
        record = self.record
        return record.exit_code if record else None

    @property
    def message(self) -> str | None:
        """The host's or worker's note on how the run ended (OOM kill, errors …)."""
        record = self.record
        return record.message if record else None

    @property
    def finished(self) -> bool:
        """Whether the run has finished (for any reason)."""
        return self.state == "Finished"

    @property
    def succeeded(self) -> bool:
        """Whether the run finished with ``Success``."""
        return self.reason == "Success"

    @property
    def page_url(self) -> str:
        """The job page (``ui/``) of this job."""
        return f"{self.client.api_url}ui/#?queue={quote(self.queue, safe='')}&job={self.job_id}"

    def definition(self) -> dict[str, Any]:
        """The stored (normalised) definition."""
        data: dict[str, Any] = self.client._json("GET", self._path + "definition.json")
        return data

    # --- waiting --------------------------------------------------------------------------------

    def wait(self, timeout: float | None = None, poll: float = 1.0) -> Self:
        """Block until the run has finished (or raise :class:`JobTimeout` after ``timeout``
        seconds); returns the job, whatever its reason. Follows the queue's websocket, or
        polls ``result.json`` every ``poll`` seconds when the websocket cannot be opened."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.refresh().finished:
            return self
        if self._wait_socket(deadline, timeout):
            return self
        while True:
            left = remaining(deadline)
            if left is not None and left <= 0:
                raise self._timeout(timeout)
            time.sleep(poll if left is None else max(0.0, min(poll, left)))
            if self.refresh().finished:
                return self

    def _timeout(self, timeout: float | None) -> JobTimeout:
        return JobTimeout(
            f"job {self.job_id[:12]} in queue {self.queue!r} did not finish within "
            f"{timeout} s (it is {self.state})"
        )

    def _wait_socket(self, deadline: float | None, timeout: float | None) -> bool:
        """Wait on the websocket: True when finished, False when it is unavailable."""
        with QueueSocket(self.client, self.queue) as sock:
            checked = time.monotonic()
            while True:
                left = remaining(deadline)
                if left is not None and left <= 0:
                    raise self._timeout(timeout)
                item = sock.get(1.0 if left is None else min(1.0, left))
                if isinstance(item, (SocketFailed, SocketEnd)):
                    log.debug("waiting without the websocket: %s", getattr(item, "error", "ended"))
                    return False
                if item is None:
                    if time.monotonic() - checked > RECHECK_SECONDS:
                        checked = time.monotonic()
                        if self.refresh().finished:
                            return True
                    continue
                kind = item.get("type")
                if kind == "snapshot":
                    runs = [r for r in item.get("runs") or [] if r.get("runId") == self.run_id]
                    if runs:
                        self._update(runs[0])
                    else:  # older than the snapshot's 100 runs: ask; later changes are events
                        self.refresh()
                        checked = time.monotonic()
                elif kind == "run":
                    run = item.get("run")
                    if isinstance(run, dict) and run.get("runId") == self.run_id:
                        self._update(run)
                if self.finished:
                    return True

    # --- logs -----------------------------------------------------------------------------------

    def logs(self, since: int = 0) -> str:
        """The stored log as text from byte offset ``since`` (a snapshot; see
        :meth:`stream_logs` to follow a live one)."""
        query = {**self._run_query, "since": since}
        with self.client._request("GET", self._path + "logs", query=query) as reply:
            if reply.status != 200:
                raise reply.error("GET")
            return reply.read().decode("utf-8", "replace")

    def log_records(self, since: int = 0) -> list[LogRecord]:
        """The stored log as records from byte offset ``since``."""
        query = {**self._run_query, "since": since, "format": "jsonl"}
        with self.client._request("GET", self._path + "logs", query=query) as reply:
            if reply.status != 200:
                raise reply.error("GET")
            raw = reply.read()
        return [record_from_json(json.loads(line)) for line in raw.splitlines() if line.strip()]

    def stream_logs(
        self, since: int = 0, timeout: float | None = None, poll: float = 1.0
    ) -> LogStream:
        """Follow the log live from byte offset ``since`` until the run finishes: an iterator
        of :class:`LogRecord` (``.text()`` gives the strings). ``stream.next`` is the offset to
        resume from. Close it (or use ``with``) to stop early."""
        return LogStream(self, since, timeout=timeout, poll=poll)

    # --- cancel ---------------------------------------------------------------------------------

    def cancel(self, namespace: str | None = None) -> dict[str, Any]:
        """Cancel the job's run in its queue; with ``namespace``, only let go of it as that
        holder (the run is cancelled when no holder is left). Returns the host's answer
        (``changed``, ``message``, ``runs``); cancelling a finished run changes nothing."""
        query = {"namespace": namespace} if namespace is not None else None
        answer: dict[str, Any] = self.client._json("POST", self._path + "cancel", query=query)
        for run in answer.get("runs") or []:
            if isinstance(run, dict):
                self._update(run)
        return answer

    # --- outputs --------------------------------------------------------------------------------

    @property
    def outputs(self) -> dict[str, dict[str, Any]]:
        """Output path → ``{"key", "size"}`` (empty until the run has finished; fetches the
        record when the one at hand is not final)."""
        record = self.record
        if record is None or record.state.value != "Finished":
            record = self.refresh().record
        if record is None:
            return {}
        return {path: {"key": out.key, "size": out.size} for path, out in record.outputs.items()}

    def _output(self, path: str) -> dict[str, Any]:
        outputs = self.outputs
        if not self.finished:
            raise ComputeQueueError(f"job {self.job_id[:12]} has not finished: wait() for it")
        if path not in outputs:
            raise ComputeQueueError(f"job {self.job_id[:12]} has no output {path!r}", 404)
        return outputs[path]

    def read_output(self, path: str, max_bytes: int = READ_LIMIT) -> bytes:
        """One output's bytes, in memory (ValueError if larger than ``max_bytes``)."""
        size = int(self._output(path)["size"])
        if size > max_bytes:
            raise ValueError(
                f"output {path!r} has {size} bytes, over max_bytes={max_bytes}: download() it"
            )
        url = self._path + "outputs/" + quote(path, safe="/")
        with self.client._request("GET", url, query=self._run_query) as reply:
            if reply.status != 200:
                raise reply.error("GET")
            data = reply.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ValueError(f"output {path!r} is over max_bytes={max_bytes}: download() it")
        return data

    def download(
        self,
        folder: str | os.PathLike[str],
        paths: Iterable[str] | None = None,
        progress: ProgressCallback | None = None,
    ) -> dict[str, Path]:
        """Write the outputs (or those in ``paths``) under ``folder``, keeping their relative
        paths, each checked against its sha256; returns output path → local file.
        ``progress`` is called with ``(done_bytes, total_bytes)`` as the bytes arrive."""
        root = Path(folder)
        outputs = self.outputs
        if not self.finished:
            raise ComputeQueueError(f"job {self.job_id[:12]} has not finished: wait() for it")
        wanted = list(outputs) if paths is None else list(paths)
        total = sum(int(outputs[p]["size"]) for p in wanted if p in outputs)
        done = 0
        written: dict[str, Path] = {}
        for path in wanted:
            out = self._output(path)
            check_path(path)  # never outside the folder
            target = root.joinpath(*path.split("/"))
            url = self._path + "outputs/" + quote(path, safe="/")
            report = None
            if progress is not None:
                base = done

                def report(n: int, base: int = base) -> None:
                    progress(base + n, total)

            self._fetch_to(url, target, self._run_query, expect=str(out["key"]), report=report)
            done += int(out["size"])
            written[path] = target
        return written

    def download_zip(
        self,
        path: str | os.PathLike[str] | None = None,
        progress: ProgressCallback | None = None,
    ) -> Path:
        """Every output as one zip, written to ``path`` (a file, or a folder to put
        ``<job id prefix>-outputs.zip`` in; default the current folder). ``progress`` is called
        with ``(done_bytes, 0)``: the zip is made on the fly, its size is not known before."""
        if not self.refresh().finished:
            raise ComputeQueueError(f"job {self.job_id[:12]} has not finished: wait() for it")
        target = Path(path) if path is not None else Path.cwd()
        if target.is_dir():
            target = target / f"{self.job_id[:12]}-outputs.zip"
        report = None if progress is None else (lambda n: progress(n, 0))
        self._fetch_to(self._path + "outputs.zip", target, self._run_query, report=report)
        return target

    def _fetch_to(
        self,
        url: str,
        target: Path,
        query: Mapping[str, Any],
        expect: str | None = None,
        report: Callable[[int], None] | None = None,
    ) -> None:
        """Stream a GET into ``target`` (via a temporary file next to it)."""
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                _stream_into(self.client, url, query, out, expect, report)
            os.replace(name, target)
        finally:
            Path(name).unlink(missing_ok=True)


def _stream_into(
    client: HttpClient,
    url: str,
    query: Mapping[str, Any],
    out: BinaryIO,
    expect: str | None,
    report: Callable[[int], None] | None = None,
) -> None:
    digest = hashlib.sha256()
    received = 0
    with client._request("GET", url, query=query) as reply:
        if reply.status != 200:
            raise reply.error("GET")
        while chunk := reply.read(CHUNK):
            digest.update(chunk)
            out.write(chunk)
            received += len(chunk)
            if report is not None:
                report(received)
    if expect is not None and digest.hexdigest() != expect:
        raise ComputeQueueError(f"{url}: the bytes received do not have the sha256 {expect}")
