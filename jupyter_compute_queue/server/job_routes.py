"""The job routes under ``[q/{queue}/]j/{id}``: the job and its runs, cancel, copy, forget,
its parts (definition, result, namespaces, logs), its input and output files and outputs.zip."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from tornado import web

from ..model.canonical import canonical_json
from ..model.job_fields import DataRef
from ..model.runs import RunRecord
from .base import BaseHandler, allow_unauthenticated, whole_number
from .blob_routes import send_blob
from .files import attachment_headers, stream_zip
from .queue_routes import admit


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
