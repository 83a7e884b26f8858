"""Blob store on the local file system: ``root/<key[:2]>/<key>``, temp files in ``root/tmp/``."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any, TypeVar

from .base import (
    BlobError,
    BlobHashMismatch,
    BlobInfo,
    BlobNotFound,
    BlobStore,
    BlobTooLarge,
    BlobWriter,
    check_key,
    check_max_bytes,
)

__all__ = ["LocalBlobStore"]

T = TypeVar("T")

# Hashing + writing costs about 1 us per KiB here; up to 64 KiB inline blocks the loop for
# less than a thread hop would cost, larger chunks go to a thread.
_INLINE_WRITE_MAX = 64 * 1024
# Directory entries stat'ed per thread call while listing.
_LIST_BATCH = 512
_DAY = 24 * 3600.0


class _Worker:
    """Runs blocking calls in a thread, one at a time.

    A thread cannot be interrupted: if the awaiting task is cancelled the call keeps going,
    so closing the file (or directory iterator) it uses must wait until it finishes.
    """

    def __init__(self) -> None:
        self._task: asyncio.Task[Any] | None = None

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self._task = task
        # shield: cancellation stops the wait, not the task, so `busy` stays truthful.
        return await asyncio.shield(task)

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    def then(self, cleanup: Callable[[], None]) -> None:
        """Run ``cleanup`` now, or when the call in flight finishes."""
        if self._task is not None and not self._task.done():
            self._task.add_done_callback(lambda _task: cleanup())
        else:
            cleanup()


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # directories cannot be opened (or fsynced) on Windows
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(file: io.BufferedWriter, tmp: Path) -> None:
    with suppress(OSError):
        file.close()
    with suppress(OSError):
        tmp.unlink(missing_ok=True)


def _refresh_existing(final: Path, size: int) -> BlobInfo | None:
    """Touch an already stored copy and return its info; None if there is none to reuse."""
    try:
        if final.stat().st_size != size:
            return None  # not a copy of these bytes (damaged?): replace it
        os.utime(final)
        st = final.stat()
    except FileNotFoundError:  # absent, or deleted meanwhile: store ours
        return None
    return BlobInfo(final.name, st.st_size, st.st_mtime)


def _commit_file(
    file: io.BufferedWriter, tmp: Path, final: Path, expected: str, actual: str, size: int
) -> BlobInfo:
    """Verify, make durable and move the temp file into place. On any failure the temp file
    is removed, so a cancelled commit still cleans up after itself."""
    replaced = False
    try:
        if actual != expected:
            raise BlobHashMismatch(expected, actual)
        info = _refresh_existing(final, size)
        if info is not None:
            _discard(file, tmp)
            return info
        file.flush()
        os.fsync(file.fileno())
        mtime = os.fstat(file.fileno()).st_mtime  # rename keeps it; no racy stat of `final`
        file.close()
        try:
            final.parent.mkdir()
        except FileExistsError:
            pass
        else:
            _fsync_dir(final.parent.parent)
        try:
            os.replace(tmp, final)
        except FileNotFoundError:
            raise BlobError(f"temp file for blob {expected} vanished before commit") from None
        replaced = True
        _fsync_dir(final.parent)
        return BlobInfo(expected, size, mtime)
    except BaseException:
        if replaced:
            # Our temp name is free again and may belong to another writer: don't unlink it.
            with suppress(OSError):
                file.close()
        else:
            _discard(file, tmp)
        raise


class _LocalBlobWriter(BlobWriter):
    def __init__(
        self,
        key: str,
        max_bytes: int | None,
        file: io.BufferedWriter,
        tmp: Path,
        final: Path,
    ) -> None:
        super().__init__(key, max_bytes)
        self._file = file
        self._tmp = tmp
        self._final = final
        self._hash = hashlib.sha256()
        self._size = 0
        self._state = "open"  # -> committing -> committed | closed
        self._info: BlobInfo | None = None
        self._worker = _Worker()

    def _check_open(self) -> None:
        if self._state != "open":
            raise BlobError(f"writer for blob {self.key} is {self._state}")
        if self._worker.busy:  # two threads must never share the file
            raise BlobError(f"writer for blob {self.key} is used by two coroutines at once")

    def _append(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        self._file.write(chunk)

    async def write(self, chunk: bytes) -> None:
        """Append ``chunk``; past ``max_bytes`` abort and raise BlobTooLarge."""
        self._check_open()
        if self.max_bytes is not None and self._size + len(chunk) > self.max_bytes:
            await self.abort()
            raise BlobTooLarge(f"blob {self.key} is larger than {self.max_bytes} bytes")
        try:
            if len(chunk) <= _INLINE_WRITE_MAX:
                self._append(chunk)
            else:
                await self._worker.run(self._append, chunk)
        except BaseException:
            # A half-written chunk leaves the hash and file out of step: give up on the blob.
            await self.abort()
            raise
        self._size += len(chunk)

    async def commit(self) -> BlobInfo:
        """Verify sha256 == key and store the blob durably; BlobHashMismatch keeps nothing."""
        if self._state == "committed" and self._info is not None:
            return self._info
        self._check_open()
        self._state = "committing"  # from here the commit call owns the temp file
        actual = self._hash.hexdigest()
        try:
            info = await self._worker.run(
                _commit_file, self._file, self._tmp, self._final, self.key, actual, self._size
            )
        except asyncio.CancelledError:
            raise  # the thread finishes the commit or cleans up on its own
        except BaseException:
            self._state = "closed"
            raise
        self._state = "committed"
        self._info = info
        return info

    async def abort(self) -> None:
        """Discard what was written; idempotent, and a no-op once commit has started."""
        if self._state != "open":
            return
        self._state = "closed"
        # Done inline rather than in a thread: close + unlink are quick, and abort often runs
        # while a task is being cancelled, when another await could be interrupted.
        file, tmp = self._file, self._tmp
        self._worker.then(lambda: _discard(file, tmp))


class LocalBlobStore(BlobStore):
    """Blobs as files under ``root``; commits are atomic and durable."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self._tmp = self.root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / key

    def _new_temp(self, key: str) -> tuple[io.BufferedWriter, Path]:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        while True:
            tmp = self._tmp / f"{key}.{secrets.token_hex(8)}.part"
            try:
                fd = os.open(tmp, flags, 0o666)  # the umask applies, as for any file
            except FileExistsError:
                continue
            except FileNotFoundError:  # someone removed tmp/: recreate it
                self._tmp.mkdir(parents=True, exist_ok=True)
                continue
            return open(fd, "wb"), tmp

    async def open_writer(self, key: str, max_bytes: int | None = None) -> BlobWriter:
        """Start writing blob ``key`` into a fresh temp file."""
        check_key(key)
        check_max_bytes(max_bytes)
        # Inline: creating a file is quick, and a thread would leak it if we were cancelled.
        file, tmp = self._new_temp(key)
        return _LocalBlobWriter(key, max_bytes, file, tmp, self._path(key))

    async def stat(self, key: str) -> BlobInfo | None:
        """Info about the blob, or None if absent."""
        check_key(key)
        try:
            st = await asyncio.to_thread(os.stat, self._path(key))
        except FileNotFoundError:
            return None
        return BlobInfo(key, st.st_size, st.st_mtime)

    def read(self, key: str, chunk_size: int = 256 * 1024) -> AsyncIterator[bytes]:
        """Stream the blob; the key is checked now, BlobNotFound comes on first iteration."""
        check_key(key)
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
        return self._read(key, chunk_size)

    async def _read(self, key: str, chunk_size: int) -> AsyncIterator[bytes]:
        try:
            # Opening is quick; a `with` cannot hold the file across yields and a cancelled
            # read in a thread, so the finally below closes it.
            file = open(self._path(key), "rb", buffering=0)  # noqa: ASYNC230, SIM115
        except FileNotFoundError:
            raise BlobNotFound(f"blob {key} not found") from None
        worker = _Worker()
        try:
            while chunk := await worker.run(file.read, chunk_size):
                yield chunk
        finally:
            worker.then(file.close)

    async def get(self, key: str, max_bytes: int | None = None) -> bytes:
        """The whole blob in one thread call; BlobTooLarge past ``max_bytes``."""
        check_key(key)
        check_max_bytes(max_bytes)
        return await asyncio.to_thread(self._read_all, key, max_bytes)

    def _read_all(self, key: str, max_bytes: int | None) -> bytes:
        try:
            with open(self._path(key), "rb") as file:
                data = file.read(-1 if max_bytes is None else max_bytes + 1)
        except FileNotFoundError:
            raise BlobNotFound(f"blob {key} not found") from None
        if max_bytes is not None and len(data) > max_bytes:
            raise BlobTooLarge(f"blob {key} is larger than {max_bytes} bytes")
        return data

    async def delete(self, key: str) -> bool:
        """Remove the blob; True if it existed."""
        check_key(key)
        try:
            await asyncio.to_thread(os.unlink, self._path(key))
        except FileNotFoundError:
            return False
        return True

    async def touch(self, key: str) -> None:
        """Set the blob's mtime (its touched_at) to now; BlobNotFound if absent."""
        check_key(key)
        try:
            await asyncio.to_thread(os.utime, self._path(key))
        except FileNotFoundError:
            raise BlobNotFound(f"blob {key} not found") from None

    async def list(self, touched_before: float | None = None) -> AsyncIterator[BlobInfo]:
        """Stream stored blobs, a directory batch at a time; ``tmp/`` and stray files are
        skipped."""
        prefixes = await asyncio.to_thread(_prefixes, self.root)
        for prefix in prefixes:
            worker = _Worker()
            try:
                entries = await worker.run(os.scandir, self.root / prefix)
            except (FileNotFoundError, NotADirectoryError):
                continue
            try:
                while True:
                    infos, more = await worker.run(_scan_batch, entries, prefix, touched_before)
                    for info in infos:
                        yield info
                    if not more:
                        break
            finally:
                # closing a scandir iterator another thread is reading would be unsafe
                worker.then(entries.close)

    async def sweep_temp(self, older_than: float = _DAY) -> int:
        """Remove temp files (abandoned writes) last modified more than ``older_than`` seconds
        ago; returns how many were removed."""
        if older_than < 0:
            raise ValueError(f"older_than must be >= 0, got {older_than}")
        return await asyncio.to_thread(self._sweep_temp, time.time() - older_than)

    def _sweep_temp(self, cutoff: float) -> int:
        removed = 0
        try:
            entries = os.scandir(self._tmp)
        except FileNotFoundError:
            return 0
        with entries:
            for entry in entries:
                with suppress(FileNotFoundError):
                    if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
        return removed

    def local_path(self, key: str) -> Path | None:
        """Path of the stored blob, or None if absent."""
        check_key(key)
        path = self._path(key)
        return path if path.is_file() else None


def _prefixes(root: Path) -> list[str]:
    """The two-hex-digit subdirectories of ``root``, sorted (so ``tmp/`` is skipped)."""
    with os.scandir(root) as entries:
        names = [e.name for e in entries if _is_prefix(e.name) and e.is_dir()]
    return sorted(names)


def _is_prefix(name: str) -> bool:
    return len(name) == 2 and all(c in "0123456789abcdef" for c in name)


def _scan_batch(
    entries: Iterator[os.DirEntry[str]], prefix: str, touched_before: float | None
) -> tuple[list[BlobInfo], bool]:
    """Up to _LIST_BATCH entries' infos, and whether the directory may have more."""
    infos: list[BlobInfo] = []
    for _ in range(_LIST_BATCH):
        entry = next(entries, None)
        if entry is None:
            return infos, False
        name = entry.name
        if not name.startswith(prefix):
            continue
        try:
            check_key(name)
            if not entry.is_file(follow_symlinks=False):
                continue
            st = entry.stat(follow_symlinks=False)
        except (BlobError, FileNotFoundError):  # stray name, or deleted meanwhile
            continue
        if touched_before is None or st.st_mtime < touched_before:
            infos.append(BlobInfo(name, st.st_size, st.st_mtime))
    return infos, True
