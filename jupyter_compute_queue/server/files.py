"""Safe file responses: files are never rendered in the host's origin (SPEC §7).

Every file, blob and zip response is an attachment with ``nosniff`` and a sandbox CSP, and its
type comes from a short allow-list; anything else is ``application/octet-stream``.
"""

from __future__ import annotations

import posixpath
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable

from ..host.blobs.base import attachment_disposition

#: Extensions whose type may be declared: raster images and plain data formats.
ALLOWED_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
    ".txt": "text/plain; charset=utf-8",
    ".log": "text/plain; charset=utf-8",
    ".csv": "text/csv; charset=utf-8",
    ".json": "application/json",
}
OCTET_STREAM = "application/octet-stream"
SANDBOX_CSP = "sandbox; default-src 'none'"


def content_type(filename: str) -> str:
    """The declared type of a file: from the allow-list by extension, else octet-stream."""
    return ALLOWED_TYPES.get(posixpath.splitext(filename)[1].lower(), OCTET_STREAM)


def attachment_headers(filename: str, declared_type: str | None = None) -> dict[str, str]:
    """Headers that make a browser download a file instead of rendering it."""
    name = posixpath.basename(filename) or "download"
    return {
        "Content-Type": declared_type or content_type(name),
        "Content-Disposition": attachment_disposition(name),
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": SANDBOX_CSP,
    }


class _Collector:
    """A write-only, unseekable file for zipfile: bytes are handed on as they come."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.chunks.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        """zipfile flushes; the bytes are taken by ``drain``."""

    def close(self) -> None:
        """Nothing to release."""

    def drain(self) -> bytes:
        data = b"".join(self.chunks)
        self.chunks.clear()
        return data


async def stream_zip(
    members: list[tuple[str, Callable[[], AsyncIterator[bytes]]]],
    send: Callable[[bytes], Awaitable[None]],
) -> None:
    """Write a zip of ``(name, open chunks)`` members to ``send`` without holding it in memory."""
    sink = _Collector()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, open_chunks in members:
            with archive.open(name, "w", force_zip64=True) as member:
                async for chunk in open_chunks():
                    member.write(chunk)
                    data = sink.drain()
                    if data:
                        await send(data)
    await send(sink.drain())
