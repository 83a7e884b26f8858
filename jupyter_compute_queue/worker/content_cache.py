"""The worker's content cache: inputs by their sha256, kept between runs and pruned to a size.

Moved out of ``transfer.py`` (which fetches into it). A file is ``root/<key[:2]>/<key>``, read
only; its modification time is when a run last used it, so pruning goes oldest use first.
Pruning never takes a file used (added or linked) in the last ``PRUNE_GRACE`` seconds: a run
between "is it cached?" and "put it in my inputs" holds it that long at most, and should it lose
it anyway the fetch downloads it again (``Transfers.fetch``).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from ..model.blob_keys import check_key

__all__ = ["DEFAULT_MAX_BYTES", "Cancelled", "ContentCache", "clone_file", "hash_file"]

log = logging.getLogger(__name__)

#: Bytes per read and write (the same as the transfers').
CHUNK = 256 * 1024
#: The cache's size by default: it is only a cache (``--max-cache-bytes``).
DEFAULT_MAX_BYTES = 10 * 1024**3
#: Files used this recently are never pruned (seconds).
PRUNE_GRACE = 600.0
#: Pruning goes down to this share of the cap, so that it does not run at every addition.
PRUNE_TO = 0.9
#: Leftover partial downloads (a worker killed mid-fetch) older than this are removed at start.
STALE_PART = 24 * 3600.0

#: ``ioctl(dest, FICLONE, src)`` (``_IOW(0x94, 9, int)`` in <linux/fs.h>): make ``dest`` share
#: ``src``'s blocks, copied on write (btrfs, XFS formatted with reflink, bcachefs).
FICLONE = 0x40049409


class Cancelled(Exception):
    """The awaiting task was cancelled: the thread stops at its next chunk."""


def _copy_into(src: Path, dest_dir: Path) -> Path:
    """Copy ``src`` to a new temp file in ``dest_dir`` and return its path."""
    fd, name = tempfile.mkstemp(dir=dest_dir, prefix="copy-", suffix=".part")
    try:
        with src.open("rb") as source, os.fdopen(fd, "wb") as target:
            shutil.copyfileobj(source, target, CHUNK)
            target.flush()
            os.fsync(target.fileno())
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def clone_file(src: Path, dest: Path) -> None:
    """Write ``dest`` (replacing it) with the bytes of ``src``, as cheaply as the file system
    allows: a reflink (no bytes copied until either file is written), else ``copy_file_range``
    (a copy inside the kernel, which some file systems turn into a reflink or a server-side
    copy themselves), else ``shutil.copyfile`` (``sendfile``, else reads and writes). ``dest``
    gets a fresh mode (0o666 less the umask), never ``src``'s."""
    with src.open("rb") as source, dest.open("wb") as target:
        try:
            fcntl.ioctl(target.fileno(), FICLONE, source.fileno())
            return
        except OSError:
            pass  # EOPNOTSUPP (ext4, tmpfs …), EXDEV, EINVAL: no reflink here
        size = os.fstat(source.fileno()).st_size
        copied = 0
        try:
            while copied < size:
                done = os.copy_file_range(source.fileno(), target.fileno(), size - copied)
                if done == 0:
                    break
                copied += done
        except OSError:
            pass  # ENOSYS (old kernel), EXDEV (some pairs of file systems), EINVAL …
        if copied == size:
            return
    shutil.copyfile(src, dest)  # starts over: a failed copy_file_range may have written part


def hash_file(path: Path, cancel: threading.Event | None = None) -> tuple[str, int]:
    """sha256 and size of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            if cancel is not None and cancel.is_set():
                raise Cancelled
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


class ContentCache:
    """The worker's content-addressed cache of inputs: ``root/<key[:2]>/<key>``, files
    read-only, temp files in ``root/tmp/``.

    A run must get its own copy (``copy=True`` of :meth:`link_into`, which reflinks where the
    file system can): its ``/inputs`` are writable, and through a hard link a job running as
    root (which ignores the read-only mode) or as the file's owner (who may chmod it) would
    change the cached bytes for every later run, on any queue.

    Methods block (file system calls); async callers run them in a thread.
    """

    def __init__(self, root: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = Path(root)
        #: Pruned (oldest use first) when the cached files pass this many bytes.
        self.max_bytes = max_bytes
        #: Where downloads are written before they are added: the same file system as the
        #: cache, so adding is a rename.
        self.tmp_dir = self.root / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._remove_stale_parts()
        #: The cached files' bytes, counted once here and kept up to date by add and prune.
        self.total = sum(size for _, size, _ in self._entries())

    def path(self, sha256: str) -> Path:
        """Where the blob ``sha256`` lives (whether or not it is there); InvalidBlobKey (a
        ValueError) unless the key is 64 lowercase hex characters."""
        key = check_key(sha256)
        return self.root / key[:2] / key

    def has(self, sha256: str) -> bool:
        """Whether the blob is in the cache."""
        return self.path(sha256).is_file()

    def add_file(self, src: Path, *, sha256: str | None = None) -> str:
        """Move the finished file ``src`` into the cache under its hash and return the hash.

        ``sha256`` saves reading the file again when the caller hashed it while writing it;
        it is trusted. ``src`` is gone afterwards (also when the blob was already cached).
        """
        key = check_key(sha256) if sha256 is not None else hash_file(src)[0]
        target = self.path(key)
        if target.is_file():  # a concurrent fetch of the same bytes got here first
            src.unlink()
            return key
        size = src.stat().st_size
        target.parent.mkdir(parents=True, exist_ok=True)
        src.chmod(0o444)
        try:
            # Atomic: a concurrent reader sees the whole file or none. Replacing a copy that
            # appeared meanwhile is harmless, both hold the same bytes.
            os.replace(src, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            # ``src`` is on another file system: copy next to the cache, then rename.
            copy = _copy_into(src, self.tmp_dir)
            copy.chmod(0o444)
            os.replace(copy, target)
            src.unlink()
        os.utime(target)  # used now: the newest
        with self._lock:
            self.total += size
        if self.total > self.max_bytes:
            self.prune()
        return key

    def link_into(self, sha256: str, dest: Path, *, copy: bool = False) -> None:
        """Put the cached blob at ``dest`` (replacing what is there), creating parent folders:
        with ``copy`` a file of its own (:func:`clone_file`), else a hard link (or that copy
        where linking fails: another file system, no hard links). FileNotFoundError if the
        blob is not cached."""
        source = self.path(sha256)
        try:
            os.utime(source)  # used now: pruning goes by last use
        except FileNotFoundError:
            raise FileNotFoundError(
                f"blob {sha256} is not in the content cache {self.root}"
            ) from None
        except OSError:
            pass  # not ours to touch (EPERM): it may go sooner, and is fetched again then
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_symlink() or dest.exists():
            dest.unlink()
        if not copy:
            try:
                os.link(source, dest)
                return
            except OSError:
                pass  # EXDEV, EPERM, EMLINK, ENOTSUP …: a copy does the job
        clone_file(source, dest)

    def prune(self) -> int:
        """Remove files, least recently used first, until the cache holds at most
        ``PRUNE_TO`` of ``max_bytes`` (files used in the last ``PRUNE_GRACE`` seconds stay,
        even over the cap); the bytes removed."""
        with self._lock:
            entries = sorted(self._entries(), key=lambda entry: entry[2])
            total = sum(size for _, size, _ in entries)
            target = int(self.max_bytes * PRUNE_TO)
            recent = time.time() - PRUNE_GRACE
            removed = 0
            for path, size, used in entries:
                if total - removed <= target or used > recent:
                    break
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("compute-queue worker: cannot prune %s: %s", path, exc)
                    continue
                removed += size
            self.total = total - removed
        if removed:
            log.info(
                "compute-queue worker: pruned %d bytes from the content cache (%d left, cap %d)",
                removed,
                self.total,
                self.max_bytes,
            )
        return removed

    def _entries(self) -> list[tuple[Path, int, float]]:
        """Every cached file: (path, size, last use)."""
        found = []
        for folder in self.root.iterdir():
            if len(folder.name) != 2 or not folder.is_dir():
                continue  # tmp/, and anything that is not a cache folder
            for path in folder.iterdir():
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                found.append((path, stat.st_size, stat.st_mtime))
        return found

    def _remove_stale_parts(self) -> None:
        old = time.time() - STALE_PART
        for path in self.tmp_dir.iterdir():
            try:
                if path.stat().st_mtime < old:
                    path.unlink()
            except OSError:
                continue
