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

Modules: :mod:`~jupyter_compute_queue.client.http` (requests, redirects, errors),
:mod:`~jupyter_compute_queue.client.uploads` (inline refs, blobs, progress),
:mod:`~jupyter_compute_queue.client.job` (:class:`Job`),
:mod:`~jupyter_compute_queue.client.logstream` (the websocket thread and :class:`LogStream`),
:mod:`~jupyter_compute_queue.client.errors`.
* **Errors** are :class:`ComputeQueueError` with the host's ``{"error"}`` message and the HTTP
  status; :class:`HostNotFound` lists every place discovery looked
  (:mod:`jupyter_compute_queue.client.discovery`).
"""

from __future__ import annotations

import copy
import hashlib
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pydantic import ValidationError

from ..model.job_fields import DataRef
from ..model.log_records import LogRecord
from ..model.runs import RunRecord
from .discovery import Host, find_host
from .errors import ComputeQueueError, HostNotFound, JobTimeout
from .http import CHUNK, Body, HttpClient, blob_upload_headers
from .job import JobBase
from .logstream import LogStream
from .uploads import (
    INLINE_LIMIT,
    Blob,
    FileSource,
    Progress,
    ProgressCallback,
    Submission,
    inline_ref,
)

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

#: Submissions per request of a batch (below the host's default max_batch_size of 1000).
BATCH_REQUEST = 500


class Job(JobBase):
    """One run of a job in a queue, as seen by the client (see :class:`.job.JobBase`): what
    :meth:`Client.submit` returns, or :meth:`attach` finds."""

    client: Client

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


class Client(HttpClient):
    """A connection to one queue host (nothing is opened until a call needs it).

    ``url`` is the Jupyter server URL including its base URL (``http://h:8888/base/``; a
    ``?token=`` in it is used as the token); without it the host is discovered
    (:mod:`jupyter_compute_queue.client.discovery`), else :class:`HostNotFound` says where it
    looked.
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
        super().__init__(host.api, host.token, timeout)
        if host.token is None and host.server_file is not None:
            self.no_token_hint = (
                f"no token was sent: {host.server_file} holds none (a server with a password "
                "login?); pass Client(token=…) or set COMPUTE_QUEUE_TOKEN"
            )
        self.queue = queue
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
        secrets: Mapping[str, str] | None = None,
    ) -> Job:
        """Submit one job and return it (joined, cached or newly queued: see ``job.cached``).

        ``definition`` is a job definition (a mapping, camelCase, or a parsed
        :class:`~jupyter_compute_queue.model.jobs.JobDefinition`). ``files`` maps input paths
        (under ``/inputs``) to local files, folders (every file below, recursively) or bytes;
        a path may not also be in the definition's ``inputs``. ``progress`` is called with
        ``(done_bytes, total_bytes)`` while blobs upload; None shows a line on stderr in a
        terminal, False shows nothing. ``namespace`` is who holds the run (SPEC §3).

        ``secrets`` maps environment variable names to values the container gets without
        them being part of the job: each name is added to the definition's ``secrets`` (names
        are in the job id, values are not, so a cached result is reused whatever the values);
        the values go in the submission only and the host keeps them in memory until the run
        ends. A name listed in the definition without a value here is taken by the worker from
        its ``COMPUTE_QUEUE_SECRET_<NAME>``, if it has one (docs/design.md, "Secrets").
        """
        item = Submission(definition, namespace, rerun, files, callbacks, secrets)
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
        "files", "callbacks", "secrets"}`` whose fields override the arguments. Beware that one
        non-default namespace holds one unfinished run: jobs of a batch that share one
        release each other, so give each its own (or none).
        """
        batch: list[Submission] = []
        for item in items:
            if isinstance(item, Mapping) and "definition" in item:
                fields = {"definition", "namespace", "rerun", "files", "callbacks", "secrets"}
                unknown = set(item) - fields
                if unknown:
                    raise ValueError(f"unknown envelope field(s): {', '.join(sorted(unknown))}")
                batch.append(
                    Submission(
                        item["definition"],
                        item.get("namespace", namespace),
                        bool(item.get("rerun", rerun)),
                        item.get("files"),
                        item.get("callbacks"),
                        item.get("secrets"),
                    )
                )
            else:
                batch.append(Submission(item, namespace, rerun, None, None))
        if not batch:
            return []
        return self._submit(batch, queue, progress, batch=True)

    def job(self, job_id: str, queue: str | None = None, run_id: str | None = None) -> Job:
        """A job already submitted, by id (see :meth:`Job.attach`)."""
        return Job.attach(job_id, queue, client=self, run_id=run_id)

    def job_data(self, job_id: str, queue: str | None = None) -> dict[str, Any]:
        """``GET [q/{queue}/]j/{id}``: ``{"jobId", "definition", "runs"}``, the runs of
        ``queue`` (every queue the caller may see when None), newest first."""
        where = f"q/{quote(queue, safe='')}/" if queue else ""
        data: dict[str, Any] = self._json("GET", f"{where}j/{quote(job_id, safe='')}")
        return data

    def cancel(
        self, job_id: str, queue: str | None = None, namespace: str | None = None
    ) -> dict[str, Any]:
        """Cancel a job's unfinished run in ``queue`` (in every queue the caller may see when
        None); see :meth:`Job.cancel` for ``namespace`` and the answer."""
        where = f"q/{quote(queue, safe='')}/" if queue else ""
        query = {"namespace": namespace} if namespace is not None else None
        data: dict[str, Any] = self._json(
            "POST", f"{where}j/{quote(job_id, safe='')}/cancel", query=query
        )
        return data

    def _submit(
        self,
        items: Sequence[Submission],
        queue: str | None,
        progress: ProgressCallback | bool | None,
        batch: bool,
    ) -> list[Job]:
        target = queue or self.queue
        blobs: dict[str, Blob] = {}
        envelopes: list[dict[str, Any]] = []
        for item in items:
            definition = self._prepare(item.definition, item.files, blobs)
            envelope: dict[str, Any] = {"definition": definition}
            if item.secrets:
                values = dict(item.secrets)
                listed = definition.get("secrets") or []
                if not isinstance(listed, list):
                    raise TypeError("the definition's secrets must be a list of names")
                definition["secrets"] = sorted({*listed, *values})
                envelope["secrets"] = values
            if item.namespace is not None:
                envelope["namespace"] = item.namespace
            if item.rerun:
                envelope["rerun"] = True
            if item.callbacks:
                envelope["callbacks"] = dict(item.callbacks)
            envelopes.append(envelope)
        self._ensure_blobs(list(blobs.values()), progress)
        path = f"q/{quote(target, safe='')}"
        answers: list[Any] = []
        if not batch:
            answers.append(self._json("POST", path, payload=envelopes[0]))
        # A host takes at most max_batch_size (default 1000) submissions per request: a bigger
        # batch goes in several requests, in order (each is all or nothing on the host).
        for start in range(0, len(envelopes) if batch else 0, BATCH_REQUEST):
            answer = self._json("POST", path, payload=envelopes[start : start + BATCH_REQUEST])
            if not isinstance(answer, list):
                raise ComputeQueueError(
                    f"the host's answer to a submission is not understood: {answer}"
                )
            answers += answer
        if len(answers) != len(items):
            raise ComputeQueueError(
                f"the host answered {len(answers)} submissions for {len(items)} sent"
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
        blobs: dict[str, Blob],
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
        self, path: str, source: FileSource, blobs: dict[str, Blob]
    ) -> Iterator[tuple[str, dict[str, str]]]:
        """(input path, DataRef) of one ``files`` entry; a folder gives one per file."""
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
            if len(data) <= INLINE_LIMIT:
                yield path, inline_ref(data)
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
            yield path, inline_ref(local.read_bytes())
        else:
            yield path, self._blob_ref(None, local, blobs)

    def _blob_ref(
        self, data: bytes | None, path: Path | None, blobs: dict[str, Blob]
    ) -> dict[str, str]:
        if data is not None:
            blob = Blob(hashlib.sha256(data).hexdigest(), len(data), data=data)
        else:
            assert path is not None
            key, size = self._hash_file(path)
            blob = Blob(key, size, path=path)
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
        blobs: dict[str, Blob] = {}
        if isinstance(source, bytes):
            ref = self._blob_ref(source, None, blobs)
        else:
            ref = self._blob_ref(None, Path(source), blobs)
        self._ensure_blobs(list(blobs.values()), progress)
        return ref["value"]

    def _ensure_blobs(self, blobs: list[Blob], progress: ProgressCallback | bool | None) -> None:
        """Upload the blobs the host does not have, reporting progress over all of them."""
        missing = [blob for blob in blobs if not self.has_blob(blob.key)]
        if not missing:
            return
        meter = Progress(progress, sum(blob.size for blob in missing), len(missing))
        done = 0
        try:
            for blob in missing:
                base = done

                def chunks(blob: Blob = blob, base: int = base) -> Iterator[bytes]:
                    return blob.chunks(lambda sent: meter.update(base + sent))

                body = Body(blob.size, chunks)
                headers = blob_upload_headers(blob.key)
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
