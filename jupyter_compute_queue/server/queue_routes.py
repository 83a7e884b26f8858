"""The queue routes: ``q/{queue}`` submits and lists runs, ``q/{queue}/status`` and
``q/{queue}/metrics``; and the submission limits a copy of a job also passes through."""

from __future__ import annotations

from contextlib import AbstractContextManager

from prometheus_client import CONTENT_TYPE_LATEST
from tornado import web

from ..host.access import Action
from ..host.limits import waiting_runs
from ..host.service_base import TooLarge
from .base import BaseHandler, allow_unauthenticated, whole_number


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
