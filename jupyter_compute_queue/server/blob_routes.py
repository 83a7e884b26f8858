"""The blob routes: ``f/{key}`` uploads (streamed, capped before a byte is read) and reads,
``f/{key}/exists``, and the blob download that the job routes share."""

from __future__ import annotations

import asyncio
import posixpath

from tornado import web

from ..host.access import Action
from ..host.blobs.base import BlobWriter
from ..host.limits import TooManyRequests
from ..model.blob_keys import check_key
from .base import BaseHandler, allow_unauthenticated, whole_number
from .files import attachment_headers

_cleanups: set[asyncio.Future[None]] = set()  # aborts in flight, kept from the collector


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
