"""The REST routes of SPEC §7: thin handlers over the queue service."""

from __future__ import annotations

import asyncio
import posixpath
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from tornado import web

from ..access import Action
from ..blobs.base import BlobWriter, check_key
from ..jobs import DataRef, canonical_json
from ..limits import TooManyRequests, waiting_runs
from ..runs import RunRecord
from ..service_base import TooLarge
from .base import BaseHandler, allow_unauthenticated, whole_number
from .files import attachment_headers, stream_zip
from .ui import UIAssetHandler, UIPageHandler, WorkerTokenHandler

API = r"/compute-queue"
_cleanups: set[asyncio.Future[None]] = set()  # aborts in flight, kept from the collector


class HealthHandler(BaseHandler):
    """Liveness: never needs credentials, reveals nothing."""

    @allow_unauthenticated
    def get(self) -> None:
        self.send_json({"ok": True})

    async def prepare(self) -> None:  # type: ignore[override]
        """No identity, no service: liveness must answer even while the store opens."""


@web.stream_request_body
class BlobHandler(BaseHandler):
    """``PUT f/{key}`` streams a blob to the store; ``GET``/``HEAD`` read it."""

    _writer: BlobWriter | None = None
    #: A body without Content-Length is charged to the upload caps as it comes.
    _metered = False
    _refused: TooManyRequests | None = None

    async def prepare(self) -> None:  # type: ignore[override]
        await super().prepare()
        if self.request.method != "PUT":
            return
        # Authorised and checked before a byte of the body is read.
        self.service.check(self.identity, Action.BLOB_WRITE, None)
        key = check_key(self.path_kwargs["key"])
        limit = self.cq.max_blob_bytes
        length = whole_number(self.request.headers.get("Content-Length"))
        if length is not None and length > limit:
            raise web.HTTPError(413, f"blob of {length} bytes is over the limit of {limit}")
        if length is not None:
            self.cq.limits.blob_bytes(self.identity, self._client(), length)
        else:
            self._metered = True
        url = await self.service.blobs.upload_url(key)
        if url is not None:  # the store takes uploads itself (a presigned S3 URL)
            self.redirect(url, status=307)
            return
        self.request.connection.set_max_body_size(limit + 1)  # type: ignore[union-attr]
        self._writer = await self.service.blobs.open_writer(key, max_bytes=limit)

    def _client(self) -> str:
        """Who the upload caps charge: the caller's address (the proxy's, unless
        ``ServerApp.trust_xheaders`` lets X-Forwarded-For through)."""
        return self.request.remote_ip or "an unknown address"

    async def data_received(self, chunk: bytes) -> None:
        if self._writer is None:
            return
        if self._metered:
            try:
                self.cq.limits.blob_bytes(self.identity, self._client(), len(chunk))
            except TooManyRequests as exc:
                self._refused = exc  # answered once the body is in; nothing of it is kept
                self._abort()
                return
        await self._writer.write(chunk)

    @allow_unauthenticated
    async def put(self, key: str) -> None:
        if self._finished:  # redirected in prepare
            return
        if self._refused is not None:
            raise self._refused
        assert self._writer is not None
        info = await self._writer.commit()
        self.send_json({"key": info.key, "size": info.size}, status=201)

    @allow_unauthenticated
    async def get(self, key: str) -> None:
        await self._send(key, head=False)

    @allow_unauthenticated
    async def head(self, key: str) -> None:
        await self._send(key, head=True)

    async def _send(self, key: str, head: bool) -> None:
        self.service.check(self.identity, Action.BLOB_READ, None)
        info = await self.service.blobs.stat(check_key(key))
        if info is None:
            raise web.HTTPError(404, f"no blob {key} on this host")
        await send_blob(self, key, key, head=head, size=info.size)

    def on_finish(self) -> None:
        self._abort()

    def on_connection_close(self) -> None:
        self._abort()
        super().on_connection_close()

    def _abort(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            # Aborting removes the temporary file; after a commit it does nothing.
            task = asyncio.ensure_future(writer.abort())
            _cleanups.add(task)
            task.add_done_callback(_cleanups.discard)


class BlobExistsHandler(BaseHandler):
    """``GET f/{key}/exists``: 200 or 404."""

    @allow_unauthenticated
    async def get(self, key: str) -> None:
        self.service.check(self.identity, Action.BLOB_READ, None)
        if not await self.service.has_blob(check_key(key)):
            raise web.HTTPError(404, f"no blob {key} on this host")
        self.send_json({"exists": True})


def admit(handler: BaseHandler, queue: str, count: int) -> AbstractContextManager[None]:
    """The limits of submitting ``count`` runs to ``queue`` (docs/host.md, "Limits"), around
    the submission. Access comes first: a caller who may not submit learns that, not that the
    queue is busy."""
    handler.service.check(handler.identity, Action.SUBMIT, queue)
    largest = handler.cq.max_batch_size
    if count > largest:
        raise TooLarge(
            f"batch: {count} submissions are more than max_batch_size = {largest}; "
            "send them in smaller batches"
        )
    service = handler.service
    return handler.cq.limits.submissions(
        handler.identity, queue, count, lambda: waiting_runs(service.stats, queue)
    )


@web.stream_request_body
class QueueHandler(BaseHandler):
    """``POST q/{queue}`` submits; ``GET q/{queue}`` lists runs, newest first.

    The body is streamed so that one over ``max_submission_bytes`` is refused before it is
    read (it is parsed as a whole, in memory)."""

    _body: bytearray | None = None

    async def prepare(self) -> None:  # type: ignore[override]
        await super().prepare()
        if self.request.method != "POST":
            return
        limit = self.cq.max_submission_bytes
        length = whole_number(self.request.headers.get("Content-Length"))
        if length is not None and length > limit:
            raise web.HTTPError(
                413,
                f"submission: {length} bytes are over max_submission_bytes = {limit}; "
                "upload big inputs as blobs and refer to them by key",
            )
        self.request.connection.set_max_body_size(limit)  # type: ignore[union-attr]
        self._body = bytearray()

    def data_received(self, chunk: bytes) -> None:
        if self._body is not None:
            self._body.extend(chunk)

    @allow_unauthenticated
    async def post(self, queue: str) -> None:
        self.request.body = bytes(self._body or b"")
        payload = self.json_body()
        count = len(payload) if isinstance(payload, list) else 1
        with admit(self, queue, count):
            answer = await self.service.submit(self.identity, queue, payload)
        for item in answer if isinstance(answer, list) else [answer]:
            item["url"] = self.public_base() + item["url"]
        self.send_json(answer)

    @allow_unauthenticated
    async def get(self, queue: str) -> None:
        limit_arg = self.get_query_argument("limit", "50")
        limit = whole_number(limit_arg)
        if limit is None:
            raise web.HTTPError(400, f"limit: {limit_arg!r} is not a whole number")
        page = await self.service.list_runs(
            self.identity,
            queue,
            states=self.get_query_arguments("state"),
            namespace=self.get_query_argument("namespace", None),
            cursor=self.get_query_argument("cursor", None),
            limit=limit,
        )
        self.send_json({"runs": [r.wire() for r in page.runs], "cursor": page.cursor})


class StatusHandler(BaseHandler):
    """``GET q/{queue}/status``."""

    @allow_unauthenticated
    async def get(self, queue: str) -> None:
        self.send_json(await self.service.status(self.identity, queue))


class MetricsHandler(BaseHandler):
    """``GET q/{queue}/metrics``: Prometheus text for the queue (the access of its status)."""

    @allow_unauthenticated
    def get(self, queue: str) -> None:
        text = self.service.metrics(self.identity, queue)
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(text)


class JobHandler(BaseHandler):
    """``GET [q/{queue}/]j/{id}``: the job and its runs (in the queues the caller may see)."""

    @allow_unauthenticated
    async def get(self, job: str, queue: str | None = None) -> None:
        data = await self.service.get_job(self.identity, self.job_id(job), queue)
        where = f"q/{queue}/" if queue else ""
        data["url"] = f"{self.public_base()}{where}j/{job}"
        self.send_json(data)


class QueueJobHandler(JobHandler):
    """``DELETE q/{queue}/j/{id}`` forgets the job's cached results in the queue."""

    @allow_unauthenticated
    async def delete(self, job: str, queue: str) -> None:
        forgotten = await self.service.forget(self.identity, queue, self.job_id(job))
        self.send_json({"jobId": job, "queue": queue, "forgotten": forgotten})


class CancelHandler(BaseHandler):
    """``POST [q/{queue}/]j/{id}/cancel[?namespace=]``."""

    @allow_unauthenticated
    async def post(self, job: str, queue: str | None = None) -> None:
        namespace = self.get_query_argument("namespace", None)
        changes = await self.service.cancel(self.identity, queue, self.job_id(job), namespace)
        changed = any(c.changed for c in changes)
        if changed and namespace is None:
            message = "cancelled"
        elif changed:
            ended = any(c.record.reason is not None for c in changes if c.changed)
            still = "; it was its last holder: cancelled" if ended else "; others still hold it"
            message = f"{namespace} let go of the run{still}"
        else:
            reasons = ", ".join(
                f"{c.record.queue}: {c.record.reason.value if c.record.reason else 'unfinished'}"
                for c in changes
            )
            message = f"nothing to cancel ({reasons})"
        self.send_json(
            {"changed": changed, "message": message, "runs": [c.record.wire() for c in changes]}
        )


class CopyHandler(BaseHandler):
    """``POST j/{id}/copy`` with ``{"queue"}``: submit the same definition elsewhere."""

    @allow_unauthenticated
    async def post(self, job: str) -> None:
        body = self.json_body()
        if not isinstance(body, dict) or not isinstance(body.get("queue"), str):
            raise web.HTTPError(400, 'queue: send {"queue": "<target queue>"}')
        namespace = body.get("namespace")
        if namespace is not None and not isinstance(namespace, str):
            raise web.HTTPError(400, "namespace: must be a string")
        with admit(self, body["queue"], 1):
            answer = await self.service.copy(
                self.identity, self.job_id(job), body["queue"], namespace
            )
        answer["url"] = self.public_base() + answer["url"]
        self.send_json(answer)


class JobPartHandler(BaseHandler):
    """``definition.json``, ``result.json``, ``namespaces.json`` and ``logs`` of a job."""

    @allow_unauthenticated
    async def get(self, job: str, part: str, queue: str | None = None) -> None:
        job = self.job_id(job)
        if part == "definition.json":
            data = await self.service.get_job(self.identity, job, queue)
            self.send_json(data["definition"])
            return
        record = await self._run(queue, job)
        if part == "result.json":
            self.send_json(record.wire())
        elif part == "namespaces.json":
            self.send_json(record.namespaces)
        else:
            await self._logs(record)

    async def _run(self, queue: str | None, job: str) -> RunRecord:
        run_id = self.get_query_argument("run", None)
        data = await self.service.get_job(self.identity, job, queue)
        for run in data["runs"]:
            if run_id is None or run["runId"] == run_id:
                return RunRecord.model_validate(run)
        raise web.HTTPError(404, f"job {job} has no run {run_id}")

    async def _logs(self, record: RunRecord) -> None:
        since_arg = self.get_query_argument("since", "0")
        since = whole_number(since_arg)
        if since is None:
            raise web.HTTPError(400, f"since: {since_arg!r} is not a byte offset")
        fmt = self.get_query_argument("format", "text")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Content-Security-Policy", "sandbox; default-src 'none'")
        self.set_header("X-Log-Bytes", str(self.service.logs.size(record.run_id)))
        logs = self.service.logs
        if fmt == "jsonl":
            self.set_header("Content-Type", "application/x-ndjson; charset=utf-8")
            while True:
                records = await asyncio.to_thread(
                    logs.read_records, record.run_id, since, 256 * 1024
                )
                if not records:
                    break
                self.write(b"".join(canonical_json(r.to_json()) + b"\n" for r in records))
                await self.flush()
                since = records[-1].end
        elif fmt == "text":
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            chunks = logs.iter_text(record.run_id, since)
            while (text := await asyncio.to_thread(next, chunks, None)) is not None:
                self.write(text.encode())
                await self.flush()
        else:
            raise web.HTTPError(400, f"format: {fmt!r} is not 'text' or 'jsonl'")
        self.finish()


class JobFileHandler(BaseHandler):
    """``inputs/{path}`` and ``outputs/{path}`` of a job, as attachments."""

    @allow_unauthenticated
    async def get(self, job: str, kind: str, path: str, queue: str | None = None) -> None:
        data = await self.service.get_job(self.identity, self.job_id(job), queue)
        if kind == "outputs":
            record = _with_outputs(data["runs"], self.get_query_argument("run", None))
            output = record.outputs.get(path) if record else None
            if output is None:
                raise web.HTTPError(404, f"job {job} has no output {path!r}")
            await send_blob(self, output.key, path)
            return
        definition = data["definition"] or {}
        ref = definition.get("inputs", {}).get(path) or definition.get("configFiles", {}).get(path)
        if ref is None:
            raise web.HTTPError(404, f"job {job} has no input {path!r}")
        if ref["type"] == "url":
            self.redirect(ref["value"], status=307)
            return
        if ref["type"] == "key":
            await send_blob(self, ref["value"], path)
            return
        content = DataRef.model_validate(ref).inline_bytes() or b""
        for name, header in attachment_headers(path).items():
            self.set_header(name, header)
        self.finish(content)


class OutputsZipHandler(BaseHandler):
    """``outputs.zip``: every output of the job's newest finished run, streamed."""

    @allow_unauthenticated
    async def get(self, job: str, queue: str | None = None) -> None:
        data = await self.service.get_job(self.identity, self.job_id(job), queue)
        record = _with_outputs(data["runs"], self.get_query_argument("run", None))
        if record is None:
            raise web.HTTPError(404, f"job {job} has no finished run")
        blobs = self.service.blobs
        members: list[tuple[str, Callable[[], AsyncIterator[bytes]]]] = [
            (name, (lambda key=out.key: blobs.read(key)))  # type: ignore[misc]
            for name, out in sorted(record.outputs.items())
        ]
        for name, header in attachment_headers(
            f"{job[:12]}-outputs.zip", "application/zip"
        ).items():
            self.set_header(name, header)

        async def send(data: bytes) -> None:
            self.write(data)
            await self.flush()

        await stream_zip(members, send)
        self.finish()


class NoRouteHandler(BaseHandler):
    """Anything else under ``compute-queue/``: a JSON 404 instead of an HTML page."""

    async def prepare(self) -> None:  # type: ignore[override]
        raise web.HTTPError(404, f"no route {self.request.path!r}; see docs/openapi.yaml")


def _with_outputs(runs: list[dict[str, Any]], run_id: str | None) -> RunRecord | None:
    """Whose outputs a job's ``outputs/`` routes serve: the run asked for, else the newest
    Success (the result a submission reuses), else the newest finished run."""
    finished = [r for r in runs if r["state"] == "Finished"]
    if run_id is not None:
        finished = [r for r in finished if r["runId"] == run_id]
    chosen = next((r for r in finished if r["reason"] == "Success"), None) or next(
        iter(finished), None
    )
    return None if chosen is None else RunRecord.model_validate(chosen)


async def send_blob(
    handler: BaseHandler, key: str, filename: str, head: bool = False, size: int | None = None
) -> None:
    """Stream a blob as an attachment named ``filename`` (or redirect to a presigned URL). A
    HEAD is answered here: a URL presigned for GET is not valid for HEAD."""
    blobs = handler.service.blobs
    headers = attachment_headers(posixpath.basename(filename))
    if not head:
        name = posixpath.basename(filename)
        url = await blobs.download_url(key, name, headers["Content-Type"])
        if url is not None:
            handler.redirect(url, status=307)
            return
    for name, value in headers.items():
        handler.set_header(name, value)
    if size is not None:
        handler.set_header("Content-Length", str(size))
    if not head:
        async for chunk in blobs.read(key):
            handler.write(chunk)
            await handler.flush()
    handler.finish()


#: Every HTTP route as an OpenAPI path template (the source of both the server's URL patterns
#: and the check against docs/openapi.yaml), most specific first.
ROUTES: list[tuple[str, type[BaseHandler]]] = [
    ("healthz", HealthHandler),
    ("f/{key}/exists", BlobExistsHandler),
    ("f/{key}", BlobHandler),
    ("q/{queue}/status", StatusHandler),
    ("q/{queue}/metrics", MetricsHandler),
    ("q/{queue}/worker-token", WorkerTokenHandler),
    ("ui/", UIPageHandler),
    ("ui/{asset}", UIAssetHandler),
    ("q/{queue}", QueueHandler),
    ("q/{queue}/j", QueueHandler),
    ("j/{job}/copy", CopyHandler),
    *[
        (prefix + suffix, handler)
        for prefix in ("q/{queue}/j/{job}", "j/{job}")
        for suffix, handler in [
            ("/cancel", CancelHandler),
            ("/outputs.zip", OutputsZipHandler),
            ("/{kind}/{path}", JobFileHandler),
            ("/{part}", JobPartHandler),
        ]
    ],
    ("q/{queue}/j/{job}", QueueJobHandler),
    ("j/{job}", JobHandler),
]

#: The regular expression of each path parameter.
PARAMETERS = {
    "key": r"[^/]+",
    "queue": r"[^/]+",
    "job": r"[^/]+",
    "kind": r"inputs|outputs",
    "path": r".+",
    "part": r"definition\.json|result\.json|namespaces\.json|logs",
    "asset": r"[A-Za-z0-9._-]+",
}


def _pattern(template: str) -> str:
    def parameter(match: re.Match[str]) -> str:
        name = match.group(1)
        return f"(?P<{name}>{PARAMETERS[name]})"

    return re.sub(
        r"\{(\w+)\}", parameter, re.escape(template).replace(r"\{", "{").replace(r"\}", "}")
    )


def routes() -> list[tuple[str, type[Any]]]:
    """The URL patterns of every route and websocket under ``compute-queue/``, then a JSON 404
    for anything else."""
    from .websockets import QueueSocket, WorkerSocket

    sockets: list[tuple[str, type[Any]]] = [("q/{queue}/ws", QueueSocket), ("worker", WorkerSocket)]
    return (
        [(f"{API}/{_pattern(t)}", h) for t, h in sockets]
        + [(pattern, handler) for _, pattern, handler in http_patterns()]
        + [(rf"{API}(?:/.*)?", NoRouteHandler)]
    )


def http_patterns() -> list[tuple[str, str, type[BaseHandler]]]:
    """(template, URL pattern, handler) of every HTTP route, in matching order."""
    return [(t, f"{API}/{_pattern(t)}", h) for t, h in ROUTES]
