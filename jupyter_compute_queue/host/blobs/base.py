"""Content-addressed blob store interface: a blob's key is the lowercase hex SHA-256 of it."""

from __future__ import annotations

import posixpath
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from ...model.blob_keys import BlobError, InvalidBlobKey, check_key

__all__ = [
    "BlobError",
    "BlobHashMismatch",
    "BlobInfo",
    "BlobNotFound",
    "BlobStore",
    "BlobTooLarge",
    "BlobWriter",
    "InvalidBlobKey",
    "attachment_disposition",
    "check_key",
]


class BlobHashMismatch(BlobError):
    """The bytes written do not hash to the key they were written under."""

    def __init__(self, expected: str, actual: str) -> None:
        # Both values go into args so the exception pickles and compares cleanly.
        super().__init__(expected, actual)
        self.expected = expected
        self.actual = actual

    def __str__(self) -> str:
        return f"blob hash mismatch: expected sha256 {self.expected}, got {self.actual}"


class BlobTooLarge(BlobError):
    """More bytes than the allowed maximum."""


class BlobNotFound(BlobError, KeyError):
    """No blob is stored under the key."""

    def __str__(self) -> str:
        # KeyError.__str__ would show the repr of the message, quotes included.
        return str(self.args[0]) if self.args else ""


def attachment_disposition(filename: str) -> str:
    """``Content-Disposition`` that makes a browser save a file as ``filename`` rather than
    render it (ASCII fallback plus the RFC 6266 UTF-8 form). Shared by the host's own file
    responses and the store's presigned downloads."""
    name = posixpath.basename(filename) or "download"
    ascii_name = name.encode("ascii", "replace").decode().replace('"', "_").replace("\\", "_")
    quoted = urllib.parse.quote(name, safe="")
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quoted}"


def check_max_bytes(max_bytes: int | None) -> int | None:
    """Return ``max_bytes`` if it is None or a non-negative int, else raise ValueError."""
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    return max_bytes


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """A stored blob: its key, size in bytes and the epoch time of its last write or touch."""

    key: str
    size: int
    touched_at: float


class BlobWriter(ABC):
    """Streams one blob into a store; nothing is visible under the key until ``commit``.

    One coroutine at a time may use a writer. Used as an async context manager it
    aborts on exit unless committed, so an exception never leaves a partial blob.
    """

    def __init__(self, key: str, max_bytes: int | None) -> None:
        self.key = check_key(key)
        self.max_bytes = check_max_bytes(max_bytes)

    @abstractmethod
    async def write(self, chunk: bytes) -> None:
        """Append ``chunk``; past ``max_bytes`` abort and raise BlobTooLarge."""

    @abstractmethod
    async def commit(self) -> BlobInfo:
        """Verify sha256 == key and store the blob; on mismatch keep nothing and raise
        BlobHashMismatch."""

    @abstractmethod
    async def abort(self) -> None:
        """Discard what was written. Idempotent, and a no-op after commit."""

    async def __aenter__(self) -> BlobWriter:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # abort() is a no-op after a successful commit, so calling it always covers both
        # the "exception" and the "left without committing" cases.
        await self.abort()


class BlobStore(ABC):
    """A content-addressed blob store. Every method rejects a malformed key with
    InvalidBlobKey before doing anything else."""

    @classmethod
    def from_config(cls, root: Path, parent: Any) -> BlobStore:
        """The store as the server extension builds it: ``root`` is the blob folder in the
        host's data dir, ``parent`` the configurable app (a traitlets store reads its own
        configuration through it). By default ``cls(root)``."""
        return cls(root)  # type: ignore[call-arg]

    @abstractmethod
    async def open_writer(self, key: str, max_bytes: int | None = None) -> BlobWriter:
        """Start writing the blob ``key``, refusing more than ``max_bytes`` bytes."""

    async def put(self, key: str, data: bytes) -> BlobInfo:
        """Store ``data`` under ``key`` (which must be its sha256)."""
        async with await self.open_writer(key) as writer:
            await writer.write(data)
            return await writer.commit()

    @abstractmethod
    async def stat(self, key: str) -> BlobInfo | None:
        """Info about the blob, or None if absent."""

    async def exists(self, key: str) -> bool:
        """Whether the blob is stored."""
        return await self.stat(key) is not None

    async def check(self, key: str) -> BlobInfo | None:
        """Info about the blob if it is stored *and* holds the bytes its key names, else None.

        The host calls it when something refers to a blob (a submission, a run's outputs). A
        store that checks every upload itself (the local one) answers like ``stat``; one whose
        uploads bypass the host (S3) hashes an object it cannot vouch for, once, and deletes
        it if it does not match.
        """
        return await self.stat(key)

    @abstractmethod
    def read(self, key: str, chunk_size: int = 256 * 1024) -> AsyncIterator[bytes]:
        """Stream the blob's bytes; iterating raises BlobNotFound if it is absent."""

    async def get(self, key: str, max_bytes: int | None = None) -> bytes:
        """The whole blob (meant for small ones); BlobTooLarge past ``max_bytes``."""
        check_key(key)
        check_max_bytes(max_bytes)
        parts: list[bytes] = []
        total = 0
        chunks = self.read(key)
        try:
            async for chunk in chunks:
                total += len(chunk)
                if max_bytes is not None and total > max_bytes:
                    raise BlobTooLarge(f"blob {key} is larger than {max_bytes} bytes")
                parts.append(chunk)
        finally:
            # Stop the reader now (closing its file) rather than whenever it is collected.
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        return b"".join(parts)

    @abstractmethod
    async def delete(self, key: str) -> bool:
        """Remove the blob; True if something was removed."""

    @abstractmethod
    async def touch(self, key: str) -> None:
        """Set the blob's touched_at to now; BlobNotFound if absent."""

    @abstractmethod
    def list(self, touched_before: float | None = None) -> AsyncIterator[BlobInfo]:
        """Stream stored blobs (in no particular order), only those with
        ``touched_at < touched_before`` if given. Never loads all keys at once."""

    def local_path(self, key: str) -> Path | None:
        """Path of the stored blob on local disk, or None (absent, or not a local store)."""
        check_key(key)
        return None

    async def download_url(self, key: str, filename: str, content_type: str) -> str | None:
        """A presigned GET URL for the blob, or None if the store cannot make one."""
        check_key(key)
        return None

    async def upload_url(self, key: str) -> str | None:
        """A presigned PUT URL for the blob, or None if the store cannot make one."""
        check_key(key)
        return None

    async def close(self) -> None:  # noqa: B027 - optional hook, deliberately not abstract
        """Release resources held by the store."""
