"""The Python client of a compute-queue host: submit jobs, follow them, fetch their outputs.

Used by the ``%%container`` magic, the job widget, the CLI and scripts::

    from jupyter_compute_queue.client import Client

    client = Client()  # the Jupyter server of this kernel, or $COMPUTE_QUEUE_URL
    job = client.submit({"image": "python:3.12-slim", "command": "python /inputs/run.py"},
                        files={"run.py": "run.py", "data.csv": "big.csv"})
    for record in job.stream_logs():
        print(record.d, end="")
    job.wait()
    job.download("results/")

Design:

* **Synchronous and thread-safe.** Every call blocks the calling thread only: REST goes over
  ``http.client`` (one connection per call, so threads never share one), and nothing runs an
  asyncio loop in the caller's thread, so the client works in a notebook cell (where the
  kernel's loop is already running), a script or any thread. The live parts (``wait`` and
  ``stream_logs``) use the queue's websocket in a background thread with a private event loop
  and hand its messages over through a queue; they fall back to polling the REST routes when
  the websocket cannot be opened. Shared state (the hash cache, a job's record) sits behind
  locks.
* **Files.** ``files`` maps input paths to local files, folders or bytes. Anything up to
  :data:`INLINE_LIMIT` bytes goes inline in the definition; anything larger is uploaded as a
  blob (``PUT f/{key}``, streamed, after asking ``GET f/{key}/exists``, so the host never gets
  the same bytes twice) and sent as a ``key`` ref. Inline refs of a definition that are larger
  are uploaded the same way; the job id does not change (it hashes the bytes).
* **Redirects** are followed by hand: the token goes only to URLs under the host's API, never
  to a presigned blob-store URL a 307 points at, nor anywhere after the chain left the host.
  Uploads send ``Expect: 100-continue``, so a host that redirects an upload (S3) answers
  before the body is sent. Proxies (``HTTP_PROXY``) are not used.
* **Errors** are :class:`ComputeQueueError` with the host's ``{"error"}`` message and the HTTP
  status; :class:`HostNotFound` lists every place discovery looked
  (:mod:`jupyter_compute_queue.discovery`).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import copy
import hashlib
import http.client
import io
import json
import logging
import os
import queue as queue_module
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Union
from urllib.parse import SplitResult, quote, urlencode, urljoin, urlsplit

from pydantic import ValidationError

from .discovery import Host, find_host
from .jobs import DataRef, check_path
from .logs import LogRecord
from .runs import RunRecord

log = logging.getLogger(__name__)

__all__ = [
    "INLINE_LIMIT",
    "Client",
    "ComputeQueueError",
    "HostNotFound",
    "Job",
    "JobTimeout",
    "LogRecord",
    "LogStream",
]

#: Inputs up to this many bytes go inline in the definition; larger ones as blobs (SPEC §2).
INLINE_LIMIT = 64 * 1024
#: Bytes per read and write while streaming.
CHUNK = 256 * 1024
#: Redirect hops followed before giving up.
MAX_REDIRECTS = 10
#: Default limit of :meth:`Job.read_output` (use :meth:`Job.download` for larger files).
READ_LIMIT = 64 * 1024 * 1024
#: How long an upload waits for ``100 Continue`` before sending the body anyway.
CONTINUE_WAIT = 1.0
#: While waiting on the websocket, the record is also fetched over REST this often (seconds),
#: in case an event was missed.
RECHECK_SECONDS = 30.0

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_RETRY_STATUS = frozenset({502, 503, 504})
_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT"})
_DEFAULT_PORTS = {"http": 80, "https": 443}

#: What a progress callback gets: (bytes uploaded so far, bytes to upload in all).
ProgressCallback = Callable[[int, int], None]
#: A file for :meth:`Client.submit`: a local path (file or folder), or the bytes themselves.
FileSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]


# --- errors ---------------------------------------------------------------------------------


class ComputeQueueError(Exception):
    """A request failed. ``message`` is the host's ``{"error"}`` text (or what went wrong on
    the way), ``status`` the HTTP status (None when there was no answer), ``url`` the URL
    without its query."""

    def __init__(self, message: str, status: int | None = None, url: str | None = None) -> None:
        self.message = message
        self.status = status
        self.url = url
        super().__init__(f"{message} (HTTP {status})" if status is not None else message)


class HostNotFound(ComputeQueueError):
    """No host was found; ``tried`` lists every place discovery looked, and why it failed."""

    def __init__(self, tried: list[str]) -> None:
        self.tried = list(tried)
        lines = "\n".join(f"  - {line}" for line in tried)
        super().__init__(
            "no compute-queue host found. Looked at:\n"
            f"{lines}\n"
            "Pass Client(url=…, token=…), or set COMPUTE_QUEUE_URL (the Jupyter server URL "
            "including its base URL) and COMPUTE_QUEUE_TOKEN."
        )


class JobTimeout(ComputeQueueError, TimeoutError):
    """A job did not finish (or its log did not end) within the time given."""


# --- small helpers --------------------------------------------------------------------------


def _safe(url: str) -> str:
    """``url`` without user info, query or fragment (tokens and signatures live there)."""
    split = urlsplit(url)
    netloc = split.netloc.rpartition("@")[2]
    return f"{split.scheme}://{netloc}{split.path}"


def _origin(split: SplitResult) -> tuple[str, str, int]:
    return (
        split.scheme,
        (split.hostname or "").lower(),
        split.port or _DEFAULT_PORTS.get(split.scheme, 0),
    )


def _record_from_json(data: Mapping[str, Any]) -> LogRecord:
    cut = data.get("cut")
    return LogRecord(
        o=int(data["o"]),
        t=int(data.get("t", 0)),
        s=str(data.get("s", "")),
        d=str(data.get("d", "")),
        cut=int(cut) if isinstance(cut, int) else 0,
    )


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover - the loop returns


def _inline_ref(data: bytes) -> dict[str, str]:
    """An inline DataRef: text when the bytes are UTF-8 (readable in the stored definition),
    else base64. Both give the same job id."""
    try:
        return {"type": "utf8", "value": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"type": "base64", "value": base64.b64encode(data).decode("ascii")}


# --- HTTP -----------------------------------------------------------------------------------


class _HeadThenSocket(io.RawIOBase):
    """Bytes already read from a socket, then the socket: lets ``HTTPResponse`` parse an
    answer whose head was consumed while waiting for ``100 Continue``."""

    def __init__(self, head: bytes, sock: socket.socket) -> None:
        self._head = head
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        return self._sock.recv_into(buffer)


class _Replay:
    """A stand-in socket for ``HTTPResponse``: only ``makefile`` is used."""

    def __init__(self, head: bytes, sock: socket.socket) -> None:
        self._head = head
        self._sock = sock

    def makefile(self, mode: str, *args: object, **kwargs: object) -> io.BufferedReader:
        return io.BufferedReader(_HeadThenSocket(self._head, self._sock))


@dataclass
class _Body:
    """A streamed request body: ``size`` bytes from a fresh iterator per attempt (a redirect or
    a retry sends it again from the start)."""

    size: int
    chunks: Callable[[], Iterator[bytes]]


class _Reply:
    """One HTTP response and its connection; closing it closes both."""

    def __init__(
        self, url: str, conn: http.client.HTTPConnection, response: http.client.HTTPResponse
    ) -> None:
        self.url = url
        self.status = response.status
        self._conn = conn
        self._response = response

    def header(self, name: str) -> str | None:
        return self._response.getheader(name)

    def read(self, size: int | None = None) -> bytes:
        """Up to ``size`` bytes of the body (all of it when None)."""
        return self._response.read(size)

    def error(self, method: str) -> ComputeQueueError:
        """The answer as an error: the host's ``{"error"}`` message, else the start of the body."""
        try:
            raw = self._response.read(64 * 1024)
        except (OSError, http.client.HTTPException):
            raw = b""
        text = raw.decode("utf-8", "replace").strip()
        with contextlib.suppress(ValueError):
            data = json.loads(text)
            if isinstance(data, dict) and isinstance(data.get("error"), str):
                text = data["error"]
        if not text:
            text = f"{method} {_safe(self.url)} answered {self.status} {self._response.reason}"
        return ComputeQueueError(text[:2000], self.status, _safe(self.url))

    def close(self) -> None:
        self._response.close()
        self._conn.close()

    def __enter__(self) -> _Reply:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Progress:
    """Upload progress: a callback, and in a terminal a line on stderr."""

    def __init__(self, callback: ProgressCallback | bool | None, total: int, files: int) -> None:
        self.total = total
        self.files = files
        self.callback = callback if callable(callback) else None
        isatty = getattr(sys.stderr, "isatty", None)
        self.terminal = callback is None and total > 0 and bool(isatty and isatty())
        self._shown = 0.0

    def update(self, done: int) -> None:
        if self.callback is not None:
            self.callback(done, self.total)
        now = time.monotonic()
        if self.terminal and (now - self._shown > 0.1 or done >= self.total):
            self._shown = now
            percent = 100 * done // self.total if self.total else 100
            sys.stderr.write(
                f"\rcompute-queue: uploading {self.files} file(s): "
                f"{_human(done)} of {_human(self.total)} ({percent}%)   "
            )
            sys.stderr.flush()

    def finish(self) -> None:
        if self.terminal:
            sys.stderr.write("\n")
            sys.stderr.flush()


@dataclass
class _Blob:
    """Bytes to be sent as a blob: held in memory, or a local file of known size."""

    key: str
    size: int
    data: bytes | None = None
    path: Path | None = None

    def chunks(self, report: Callable[[int], None]) -> Iterator[bytes]:
        sent = 0
        if self.data is not None:
            view = memoryview(self.data)
            while sent < self.size:
                chunk = bytes(view[sent : sent + CHUNK])
                sent += len(chunk)
                yield chunk
                report(sent)
            return
        assert self.path is not None
        with self.path.open("rb") as file:
            while sent < self.size:
                chunk = file.read(min(CHUNK, self.size - sent))
                if not chunk:
                    raise ComputeQueueError(f"{self.path} shrank while it was being uploaded")
                sent += len(chunk)
                yield chunk
                report(sent)


@dataclass
class _Submission:
    definition: Any
    namespace: str | None
    rerun: bool
    files: Mapping[str, FileSource] | None
    callbacks: Mapping[str, str] | None


# --- the client -----------------------------------------------------------------------------


class Client:
    """A connection to one queue host (nothing is opened until a call needs it).

    ``url`` is the Jupyter server URL including its base URL (``http://h:8888/base/``; a
    ``?token=`` in it is used as the token); without it the host is discovered
    (:mod:`jupyter_compute_queue.discovery`), else :class:`HostNotFound` says where it looked.
    ``queue`` is the default queue of every call; ``timeout`` the seconds a socket may stay
    silent before a request fails.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        queue: str = "local",
        *,
        timeout: float = 60.0,
    ) -> None:
        host, tried = find_host(url, token)
        if host is None:
            raise HostNotFound(tried)
        self.host: Host = host
        #: The Jupyter server URL, with its base URL, ending in ``/``.
        self.url = host.url
        #: The compute-queue API, ``{url}compute-queue/``.
        self.api_url = host.api
        self.token = host.token
        self.queue = queue
        self.timeout = timeout
        self._api = urlsplit(self.api_url)
        self._api_origin = _origin(self._api)
        self._ssl = ssl.create_default_context()
        self._lock = threading.Lock()
        self._hashes: dict[tuple[str, int, int, int, int], str] = {}

    def __repr__(self) -> str:
        return f"Client({self.url!r}, queue={self.queue!r}, found via {self.host.source})"

    # --- jobs ---------------------------------------------------------------------------------

    def submit(
        self,
        definition: Mapping[str, Any] | Any,
        queue: str | None = None,
        namespace: str | None = None,
        rerun: bool = False,
        files: Mapping[str, FileSource] | None = None,
        *,
        progress: ProgressCallback | bool | None = None,
        callbacks: Mapping[str, str] | None = None,
    ) -> Job:
        """Submit one job and return it (joined, cached or newly queued: see ``job.cached``).

        ``definition`` is a job definition (a mapping, camelCase, or a parsed
        :class:`~jupyter_compute_queue.jobs.JobDefinition`). ``files`` maps input paths
        (under ``/inputs``) to local files, folders (every file below, recursively) or bytes;
        a path may not also be in the definition's ``inputs``. ``progress`` is called with
        ``(done_bytes, total_bytes)`` while blobs upload; None shows a line on stderr in a
        terminal, False shows nothing. ``namespace`` is who holds the run (SPEC §3).
        """
        item = _Submission(definition, namespace, rerun, files, callbacks)
        return self._submit([item], queue, progress, batch=False)[0]

    def submit_batch(
        self,
        items: Iterable[Mapping[str, Any]],
        queue: str | None = None,
        namespace: str | None = None,
        rerun: bool = False,
        *,
        progress: ProgressCallback | bool | None = None,
    ) -> list[Job]:
        """Submit several jobs in one request; the jobs come back in the same order.

        Each item is a definition, or an envelope ``{"definition", "namespace", "rerun",
        "files", "callbacks"}`` whose fields override the arguments. Beware that one
        non-default namespace holds one unfinished run: jobs of a batch that share one
        release each other, so give each its own (or none).
        """
        batch: list[_Submission] = []
        for item in items:
            if isinstance(item, Mapping) and "definition" in item:
                unknown = set(item) - {"definition", "namespace", "rerun", "files", "callbacks"}
                if unknown:
                    raise ValueError(f"unknown envelope field(s): {', '.join(sorted(unknown))}")
                batch.append(
                    _Submission(
                        item["definition"],
                        item.get("namespace", namespace),
                        bool(item.get("rerun", rerun)),
                        item.get("files"),
                        item.get("callbacks"),
                    )
                )
            else:
                batch.append(_Submission(item, namespace, rerun, None, None))
        if not batch:
            return []
        return self._submit(batch, queue, progress, batch=True)

    def job(self, job_id: str, queue: str | None = None, run_id: str | None = None) -> Job:
        """A job already submitted, by id (see :meth:`Job.attach`)."""
        return Job.attach(job_id, queue, client=self, run_id=run_id)

    def _submit(
        self,
        items: Sequence[_Submission],
        queue: str | None,
        progress: ProgressCallback | bool | None,
        batch: bool,
    ) -> list[Job]:
        target = queue or self.queue
        blobs: dict[str, _Blob] = {}
        envelopes: list[dict[str, Any]] = []
        for item in items:
            definition = self._prepare(item.definition, item.files, blobs)
            envelope: dict[str, Any] = {"definition": definition}
            if item.namespace is not None:
                envelope["namespace"] = item.namespace
            if item.rerun:
                envelope["rerun"] = True
            if item.callbacks:
                envelope["callbacks"] = dict(item.callbacks)
            envelopes.append(envelope)
        self._ensure_blobs(list(blobs.values()), progress)
        answer = self._json(
            "POST", f"q/{quote(target, safe='')}", payload=envelopes if batch else envelopes[0]
        )
        answers = answer if batch else [answer]
        if not isinstance(answers, list) or len(answers) != len(items):
            raise ComputeQueueError(
                f"the host's answer to a submission is not understood: {answer}"
            )
        jobs = [Job._from_answer(self, a, i.namespace) for a, i in zip(answers, items, strict=True)]
        for job in jobs:
            if job.cached:  # a finished result: its record (reason, outputs) is final, get it
                job.refresh()
        return jobs

    # --- definitions and files ---------------------------------------------------------------

    def _prepare(
        self,
        definition: Mapping[str, Any] | Any,
        files: Mapping[str, FileSource] | None,
        blobs: dict[str, _Blob],
    ) -> dict[str, Any]:
        """The definition to send: ``files`` added to ``inputs``, and every inline ref over
        :data:`INLINE_LIMIT` swapped for a ``key`` ref (its blob put in ``blobs``)."""
        wire = getattr(definition, "wire", None)
        if callable(wire):  # a parsed JobDefinition
            definition = wire()
        if not isinstance(definition, Mapping):
            raise TypeError(f"a job definition is a mapping, not {type(definition).__name__}")
        defn: dict[str, Any] = copy.deepcopy(dict(definition))
        for field in ("inputs", "configFiles"):
            refs = defn.get(field)
            if not isinstance(refs, dict):
                continue
            for path, ref in list(refs.items()):
                big = self._large_inline(ref)
                if big is not None:
                    refs[path] = self._blob_ref(big, None, blobs)
        if files:
            inputs = defn.get("inputs")
            if inputs is None:
                inputs = defn["inputs"] = {}
            if not isinstance(inputs, dict):
                raise TypeError("the definition's inputs must be a mapping to add files to it")
            for path, source in files.items():
                for input_path, ref in self._file_refs(path, source, blobs):
                    if input_path in inputs:
                        raise ValueError(
                            f"inputs.{input_path}: given both in the definition and in files"
                        )
                    inputs[input_path] = ref
        return defn

    @staticmethod
    def _large_inline(ref: Any) -> bytes | None:
        """The bytes of an inline ref larger than :data:`INLINE_LIMIT`, else None (refs that
        do not validate are left for the host to refuse with its message)."""
        if not isinstance(ref, Mapping) or ref.get("type") not in ("utf8", "base64", "json"):
            return None
        try:
            data = DataRef.model_validate(dict(ref)).inline_bytes()
        except (ValidationError, ValueError):
            return None
        return data if data is not None and len(data) > INLINE_LIMIT else None

    def _file_refs(
        self, path: str, source: FileSource, blobs: dict[str, _Blob]
    ) -> Iterator[tuple[str, dict[str, str]]]:
        """(input path, DataRef) of one ``files`` entry; a folder gives one per file."""
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
            if len(data) <= INLINE_LIMIT:
                yield path, _inline_ref(data)
            else:
                yield path, self._blob_ref(data, None, blobs)
            return
        local = Path(source)
        if local.is_dir():
            found = False
            for folder, dirs, names in os.walk(local):
                dirs.sort()
                for name in sorted(names):
                    file = Path(folder) / name
                    if file.is_file():
                        found = True
                        relative = file.relative_to(local).as_posix()
                        yield from self._file_refs(f"{path.rstrip('/')}/{relative}", file, blobs)
            if not found:
                raise ValueError(f"files[{path!r}]: the folder {local} holds no files")
            return
        size = local.stat().st_size  # FileNotFoundError names the path
        if size <= INLINE_LIMIT:
            yield path, _inline_ref(local.read_bytes())
        else:
            yield path, self._blob_ref(None, local, blobs)

    def _blob_ref(
        self, data: bytes | None, path: Path | None, blobs: dict[str, _Blob]
    ) -> dict[str, str]:
        if data is not None:
            blob = _Blob(hashlib.sha256(data).hexdigest(), len(data), data=data)
        else:
            assert path is not None
            key, size = self._hash_file(path)
            blob = _Blob(key, size, path=path)
        blobs.setdefault(blob.key, blob)
        return {"type": "key", "value": blob.key}

    def _hash_file(self, path: Path) -> tuple[str, int]:
        """sha256 and size of a file, remembered while the file stays the same (same inode,
        size and mtime), so a large file submitted again is not read again."""
        stat = path.stat()
        ident = (str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            known = self._hashes.get(ident)
        if known is not None:
            return known, stat.st_size
        digest = hashlib.sha256()
        size = 0
        with path.open("rb") as file:
            while chunk := file.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
        key = digest.hexdigest()
        if size == stat.st_size:
            with self._lock:
                self._hashes[ident] = key
        return key, size

    # --- blobs ----------------------------------------------------------------------------------

    def has_blob(self, key: str) -> bool:
        """Whether the host has the blob ``key`` (its sha256)."""
        with self._request("GET", f"f/{quote(key, safe='')}/exists") as reply:
            if reply.status == 404:
                return False
            if reply.status != 200:
                raise reply.error("GET")
            return True

    def upload(
        self,
        source: str | os.PathLike[str] | bytes,
        progress: ProgressCallback | bool | None = None,
    ) -> str:
        """Put a file (a local path) or bytes in the host's blob store unless the host has it;
        return its key (sha256)."""
        blobs: dict[str, _Blob] = {}
        if isinstance(source, bytes):
            ref = self._blob_ref(source, None, blobs)
        else:
            ref = self._blob_ref(None, Path(source), blobs)
        self._ensure_blobs(list(blobs.values()), progress)
        return ref["value"]

    def _ensure_blobs(self, blobs: list[_Blob], progress: ProgressCallback | bool | None) -> None:
        """Upload the blobs the host does not have, reporting progress over all of them."""
        missing = [blob for blob in blobs if not self.has_blob(blob.key)]
        if not missing:
            return
        meter = _Progress(progress, sum(blob.size for blob in missing), len(missing))
        done = 0
        try:
            for blob in missing:
                base = done

                def chunks(blob: _Blob = blob, base: int = base) -> Iterator[bytes]:
                    return blob.chunks(lambda sent: meter.update(base + sent))

                body = _Body(blob.size, chunks)
                headers = {"Content-Type": "application/octet-stream"}
                with self._request("PUT", f"f/{blob.key}", headers=headers, body=body) as reply:
                    if not 200 <= reply.status < 300:
                        raise reply.error("PUT")
                done += blob.size
        finally:
            meter.finish()

    # --- queues ---------------------------------------------------------------------------------

    def status(self, queue: str | None = None) -> dict[str, Any]:
        """``GET q/{queue}/status``: counts by state, workers, the oldest queued age."""
        data: dict[str, Any] = self._json("GET", f"q/{quote(queue or self.queue, safe='')}/status")
        return data

    def runs(
        self,
        queue: str | None = None,
        state: str | Sequence[str] | None = None,
        namespace: str | None = None,
        limit: int = 50,
    ) -> list[RunRecord]:
        """The queue's newest runs (one page of at most ``limit``), newest first."""
        query: dict[str, Any] = {"limit": limit}
        if state is not None:
            query["state"] = [state] if isinstance(state, str) else list(state)
        if namespace is not None:
            query["namespace"] = namespace
        data = self._json("GET", f"q/{quote(queue or self.queue, safe='')}", query=query)
        return [RunRecord.model_validate(run) for run in data.get("runs", [])]

    def forget(self, job_id: str, queue: str | None = None) -> int:
        """Forget a job's cached results in the queue; how many were forgotten."""
        path = f"q/{quote(queue or self.queue, safe='')}/j/{quote(job_id, safe='')}"
        return int(self._json("DELETE", path).get("forgotten", 0))

    # --- HTTP -------------------------------------------------------------------------------------

    def _url(self, path: str, query: Mapping[str, Any] | None = None) -> str:
        url = path if "://" in path else self.api_url + path
        if query:
            url += ("&" if "?" in url else "?") + urlencode(query, doseq=True)
        return url

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"} if self.token else {}

    def _json(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        payload: Any = None,
    ) -> Any:
        """A JSON request; the parsed answer, or ComputeQueueError with the host's message."""
        headers = {"Accept": "application/json"}
        body = None
        if payload is not None:
            body = json.dumps(payload, ensure_ascii=False).encode()
            headers["Content-Type"] = "application/json"
        with self._request(method, path, query=query, headers=headers, body=body) as reply:
            if not 200 <= reply.status < 300:
                raise reply.error(method)
            raw = reply.read()
        try:
            return json.loads(raw)
        except ValueError:
            raise ComputeQueueError(
                f"{method} {_safe(self._url(path))} answered something that is not JSON",
                reply.status,
            ) from None

    def _request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | _Body | None = None,
    ) -> _Reply:
        """Send a request (retrying idempotent ones on connection errors and 502-504); the
        caller closes the reply, whatever its status."""
        url = self._url(path, query)
        attempts = 3 if method in _IDEMPOTENT else 1
        for attempt in range(attempts):
            try:
                reply = self._follow(method, url, headers or {}, body)
            except ComputeQueueError:
                raise
            except (OSError, http.client.HTTPException) as exc:
                error = ComputeQueueError(
                    f"{method} {_safe(url)}: cannot reach the host ({exc or type(exc).__name__})"
                )
            else:
                if reply.status not in _RETRY_STATUS or attempt + 1 >= attempts:
                    return reply
                error = reply.error(method)
                reply.close()
            if attempt + 1 >= attempts:
                raise error
            time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _follow(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | _Body | None
    ) -> _Reply:
        """One request with its redirects; the token only while the chain stays on the API."""
        trusted = True
        for _hop in range(MAX_REDIRECTS + 1):
            split = urlsplit(url)
            if split.scheme not in _DEFAULT_PORTS or not split.hostname:
                raise ComputeQueueError(f"{_safe(url)}: only http and https URLs can be used")
            trusted = trusted and (
                _origin(split) == self._api_origin and split.path.startswith(self._api.path)
            )
            hop = dict(headers)
            if trusted:
                hop.update(self._auth_headers())
            reply = self._exchange(method, url, split, hop, body)
            if reply.status not in _REDIRECTS:
                return reply
            with reply:
                location = reply.header("Location")
            if not location:
                raise ComputeQueueError(
                    f"{method} {_safe(url)} redirected without a Location", reply.status
                )
            if method not in ("GET", "HEAD") and reply.status not in (307, 308):
                raise ComputeQueueError(
                    f"{method} {_safe(url)} answered {reply.status}, which would drop the body",
                    reply.status,
                )
            url = urljoin(url, location)
        raise ComputeQueueError(f"{method} {_safe(url)}: more than {MAX_REDIRECTS} redirects")

    def _exchange(
        self,
        method: str,
        url: str,
        split: SplitResult,
        headers: Mapping[str, str],
        body: bytes | _Body | None,
    ) -> _Reply:
        host, port = split.hostname or "", split.port or _DEFAULT_PORTS[split.scheme]
        conn: http.client.HTTPConnection
        if split.scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=self.timeout, context=self._ssl)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        try:
            target = (split.path or "/") + (f"?{split.query}" if split.query else "")
            conn.putrequest(method, target, skip_accept_encoding=True)
            for name, value in headers.items():
                conn.putheader(name, value)
            if body is None:
                conn.endheaders()
            elif isinstance(body, bytes):
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
            else:
                conn.putheader("Content-Length", str(body.size))
                if body.size:
                    conn.putheader("Expect", "100-continue")
                conn.endheaders()
                early = self._await_continue(conn) if body.size else None
                if early is not None:  # answered before the body: a redirect, 401, 413 …
                    assert conn.sock is not None
                    response = http.client.HTTPResponse(
                        _Replay(early, conn.sock),  # type: ignore[arg-type]
                        method=method,
                    )
                    response.begin()
                    return _Reply(url, conn, response)
                try:
                    for chunk in body.chunks():
                        conn.send(chunk)
                except OSError:
                    # The host may have answered and closed mid-body: its answer says more.
                    with contextlib.suppress(OSError, http.client.HTTPException):
                        return _Reply(url, conn, conn.getresponse())
                    raise
            return _Reply(url, conn, conn.getresponse())
        except BaseException:
            conn.close()
            raise

    def _await_continue(self, conn: http.client.HTTPConnection) -> bytes | None:
        """Wait up to :data:`CONTINUE_WAIT` for the answer to ``Expect: 100-continue``: None
        means send the body (``100 Continue``, or silence); bytes are the head of a final
        answer sent instead. The head is read byte by byte: what follows is not ours."""
        sock = conn.sock
        assert sock is not None
        while True:
            sock.settimeout(CONTINUE_WAIT)
            try:
                first = sock.recv(1)
            except TimeoutError:
                return None
            finally:
                sock.settimeout(self.timeout)
            if not first:
                raise ConnectionError("the host closed the connection before answering")
            head = bytearray(first)
            while not head.endswith(b"\r\n\r\n"):
                byte = sock.recv(1)
                if not byte:
                    raise ConnectionError("the host closed the connection inside an answer")
                head += byte
                if len(head) > 64 * 1024:
                    raise http.client.HTTPException("answer head too long")
            status = bytes(head).split(b" ", 2)[1:2]
            if not status or not status[0].startswith(b"1"):
                return bytes(head)
            if status[0] == b"100":
                return None
            # another 1xx (103 Early Hints): wait for the real answer

    def _ws_url(self, queue: str) -> str:
        scheme = "wss" if self._api.scheme == "https" else "ws"
        return f"{scheme}://{self._api.netloc}{self._api.path}q/{quote(queue, safe='')}/ws"


# --- jobs -------------------------------------------------------------------------------------


class Job:
    """One run of a job in a queue, as seen by the client.

    From the submission's answer: ``job_id``, ``run_id``, ``queue``, ``cached`` and ``url`` (the
    job in its queue). From the run record (``record``, fetched by :meth:`refresh`, kept up to
    date by :meth:`wait`): ``state``, ``phase``, ``reason``, ``exit_code``, ``message``,
    ``outputs``. Safe to share between threads.
    """

    def __init__(
        self,
        client: Client,
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

    @classmethod
    def _from_answer(cls, client: Client, answer: Any, namespace: str | None) -> Job:
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

    @classmethod
    def attach(
        cls,
        job_id: str,
        queue: str | None = None,
        client: Client | None = None,
        run_id: str | None = None,
    ) -> Job:
        """A job submitted before (by this process or another): its newest run in ``queue``
        (every queue the caller may see when None), or the run ``run_id``."""
        if client is None:
            client = Client(queue=queue or "local")
        where = f"q/{quote(queue, safe='')}/" if queue else ""
        data = client._json("GET", f"{where}j/{quote(job_id, safe='')}")
        runs = data.get("runs") or []
        chosen = next((r for r in runs if run_id is None or r.get("runId") == run_id), None)
        if chosen is None:
            place = f"in queue {queue!r}" if queue else "in any queue you may see"
            what = f"no run {run_id}" if run_id else "no run"
            raise ComputeQueueError(f"job {job_id} has {what} {place}", 404)
        record = RunRecord.model_validate(chosen)
        job = cls(
            client,
            record.job_id,
            record.run_id,
            record.queue,
            cached=record.cached,
            state=record.state.value,
            record=record,
        )
        if queue:
            job.url = data.get("url") or job.url
        return job

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

    def refresh(self) -> Job:
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

    def wait(self, timeout: float | None = None, poll: float = 1.0) -> Job:
        """Block until the run has finished (or raise :class:`JobTimeout` after ``timeout``
        seconds); returns the job, whatever its reason. Follows the queue's websocket, or
        polls ``result.json`` every ``poll`` seconds when the websocket cannot be opened."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.refresh().finished:
            return self
        if self._wait_socket(deadline, timeout):
            return self
        while True:
            left = _remaining(deadline)
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
        with _Socket(self.client, self.queue) as sock:
            checked = time.monotonic()
            while True:
                left = _remaining(deadline)
                if left is not None and left <= 0:
                    raise self._timeout(timeout)
                item = sock.get(1.0 if left is None else min(1.0, left))
                if isinstance(item, (_Failed, _End)):
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
        return [_record_from_json(json.loads(line)) for line in raw.splitlines() if line.strip()]

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
        self, folder: str | os.PathLike[str], paths: Iterable[str] | None = None
    ) -> dict[str, Path]:
        """Write the outputs (or those in ``paths``) under ``folder``, keeping their relative
        paths, each checked against its sha256; returns output path → local file."""
        root = Path(folder)
        outputs = self.outputs
        if not self.finished:
            raise ComputeQueueError(f"job {self.job_id[:12]} has not finished: wait() for it")
        wanted = list(outputs) if paths is None else list(paths)
        written: dict[str, Path] = {}
        for path in wanted:
            out = self._output(path)
            check_path(path)  # never outside the folder
            target = root.joinpath(*path.split("/"))
            url = self._path + "outputs/" + quote(path, safe="/")
            self._fetch_to(url, target, self._run_query, expect=str(out["key"]))
            written[path] = target
        return written

    def download_zip(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Every output as one zip, written to ``path`` (a file, or a folder to put
        ``<job id prefix>-outputs.zip`` in; default the current folder)."""
        if not self.refresh().finished:
            raise ComputeQueueError(f"job {self.job_id[:12]} has not finished: wait() for it")
        target = Path(path) if path is not None else Path.cwd()
        if target.is_dir():
            target = target / f"{self.job_id[:12]}-outputs.zip"
        self._fetch_to(self._path + "outputs.zip", target, self._run_query)
        return target

    def _fetch_to(
        self, url: str, target: Path, query: Mapping[str, Any], expect: str | None = None
    ) -> None:
        """Stream a GET into ``target`` (via a temporary file next to it)."""
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                _stream_into(self.client, url, query, out, expect)
            os.replace(name, target)
        finally:
            Path(name).unlink(missing_ok=True)


def _stream_into(
    client: Client, url: str, query: Mapping[str, Any], out: BinaryIO, expect: str | None
) -> None:
    digest = hashlib.sha256()
    with client._request("GET", url, query=query) as reply:
        if reply.status != 200:
            raise reply.error("GET")
        while chunk := reply.read(CHUNK):
            digest.update(chunk)
            out.write(chunk)
    if expect is not None and digest.hexdigest() != expect:
        raise ComputeQueueError(f"{url}: the bytes received do not have the sha256 {expect}")


# --- the websocket in a thread ----------------------------------------------------------------


@dataclass
class _Failed:
    """The websocket could not be opened, or was refused (the reader falls back to REST,
    which raises the host's own error if it is refused too)."""

    error: ComputeQueueError


class _End:
    """The websocket thread has ended."""


_Item = dict[str, Any] | _Failed | _End


class _Socket:
    """The queue's websocket (``q/{queue}/ws``) in a background thread with its own event loop.

    Messages arrive in a bounded queue (``get``), so a slow reader slows the socket, not
    memory. With ``run_id`` the run's log is subscribed from ``since``; after a dropped
    connection the thread reconnects and subscribes again from the ``next`` offset of the last
    log message, so nothing is lost or repeated. The subscription's ``done`` ends the thread.
    """

    def __init__(
        self,
        client: Client,
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
        self._items: queue_module.Queue[_Item] = queue_module.Queue(maxsize=64)
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: Any = None
        #: How many times a connection was opened (a reconnect counts again).
        self.connections = 0
        self._thread = threading.Thread(
            target=self._main, name=f"compute-queue-ws-{queue}", daemon=True
        )
        self._thread.start()

    def get(self, timeout: float) -> _Item | None:
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

    def __enter__(self) -> _Socket:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def _offer(self, item: _Item) -> bool:
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
            self._offer(_Failed(ComputeQueueError(f"websocket {_safe(self._url)}: {exc}")))
        finally:
            self._offer(_End())

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
                    self._offer(_Failed(_ws_refusal(exc, self._url)))
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
                message = f"cannot open the websocket {_safe(self._url)}: {error}"
                self._offer(_Failed(ComputeQueueError(message)))
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
    message = f"websocket {_safe(url)} refused"
    response = getattr(exc, "response", None)
    raw = getattr(response, "body", None) if response is not None else None
    if raw:
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            data = json.loads(raw)
            if isinstance(data, dict) and isinstance(data.get("error"), str):
                message = data["error"]
    return ComputeQueueError(message, int(exc.code), _safe(url))


class LogStream:
    """A run's log, live: an iterator of :class:`LogRecord` that ends when the run has finished
    and its whole log has been seen.

    ``next`` is the offset to resume from (the end of the last record returned). Records come
    over the queue's websocket; when it cannot be opened the stream polls the stored log
    (``GET …/logs?format=jsonl&since=``) every ``poll`` seconds. With ``timeout`` (seconds),
    :class:`JobTimeout` is raised if the stream has not ended by then.
    """

    def __init__(
        self, job: Job, since: int = 0, timeout: float | None = None, poll: float = 1.0
    ) -> None:
        self.job = job
        self.next = since
        self._poll = poll
        self._timeout = timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._buffer: collections.deque[LogRecord] = collections.deque()
        self._done = False
        self._final = False  # polling: the run was seen finished; one more read, then done
        self._socket: _Socket | None = _Socket(job.client, job.queue, job.run_id, since)

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
            left = _remaining(self._deadline)
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
        if isinstance(item, (_Failed, _End)):
            log.debug("following the log without the websocket: %s", getattr(item, "error", ""))
            self._socket.close()
            self._socket = None  # poll from here on, from self.next
            return
        kind = item.get("type")
        if kind == "logs" and item.get("runId") == self.job.run_id:
            self._buffer.extend(_record_from_json(r) for r in item.get("records") or [])
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

    def __enter__(self) -> LogStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
