"""What the client sends with a submission: inline refs, blobs to upload, upload progress."""

from __future__ import annotations

import base64
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from .errors import ComputeQueueError
from .http import CHUNK

#: Inputs up to this many bytes go inline in the definition; larger ones as blobs (SPEC §2).
INLINE_LIMIT = 64 * 1024

#: What a progress callback gets: (bytes uploaded so far, bytes to upload in all).
ProgressCallback = Callable[[int, int], None]
#: A file for :meth:`Client.submit`: a local path (file or folder), or the bytes themselves.
FileSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover - the loop returns


def inline_ref(data: bytes) -> dict[str, str]:
    """An inline DataRef: text when the bytes are UTF-8 (readable in the stored definition),
    else base64. Both give the same job id."""
    try:
        return {"type": "utf8", "value": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"type": "base64", "value": base64.b64encode(data).decode("ascii")}


# --- HTTP -----------------------------------------------------------------------------------


class Progress:
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
                f"{human_size(done)} of {human_size(self.total)} ({percent}%)   "
            )
            sys.stderr.flush()

    def finish(self) -> None:
        if self.terminal:
            sys.stderr.write("\n")
            sys.stderr.flush()


@dataclass
class Blob:
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
class Submission:
    definition: Any
    namespace: str | None
    rerun: bool
    files: Mapping[str, FileSource] | None
    callbacks: Mapping[str, str] | None
    #: Secret values by name (sent in the envelope only; the names join the definition).
    secrets: Mapping[str, str] | None = None


# --- the client -----------------------------------------------------------------------------
