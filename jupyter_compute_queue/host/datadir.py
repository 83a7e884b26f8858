"""One host process owns a data dir (SPEC §10).

A second process finds the lock held, says so, and takes a folder of its own next to it
(``<dir>-2``, ``<dir>-3`` …), so two Jupyter servers never write the same SQLite file and each
finds its own state again after a restart. A data dir on a network file system gets a warning:
SQLite's locking and fsync are not reliable there.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from jupyter_core.paths import jupyter_data_dir

log = logging.getLogger(__name__)

LOCK_NAME = "host.lock"
SECRET_NAME = "secret"
_NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "fuse.sshfs", "afs", "ceph", "lustre"}


class DataDirLocked(RuntimeError):
    """Every candidate folder is owned by another process."""


@dataclass
class DataDir:
    """An owned data dir; ``release`` (or process exit) lets it go."""

    path: Path
    _handle: IO[str]

    def release(self) -> None:
        """Give up ownership."""
        if not self._handle.closed:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()


def acquire(preferred: str | os.PathLike[str], attempts: int = 10) -> DataDir:
    """Own ``preferred``, or the first free ``<preferred>-N``; DataDirLocked if none is free."""
    base = Path(preferred)
    for n in range(1, attempts + 1):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        path.mkdir(parents=True, exist_ok=True)
        handle = open(path / LOCK_NAME, "a+")  # noqa: SIM115 - held open for the process's life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            log.warning("compute-queue: %s is in use by %s; trying the next folder", path, owner)
            continue
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        if n > 1:
            log.warning("compute-queue: using %s because %s belongs to another process", path, base)
        fs = filesystem_type(path)
        if fs in _NETWORK_FS:
            log.warning(
                "compute-queue: %s is on a network file system (%s); SQLite may lose or corrupt "
                "data there: set ComputeQueueApp.data_dir to a local folder",
                path,
                fs,
            )
        return DataDir(path, handle)
    raise DataDirLocked(
        f"{base} and {attempts - 1} folders next to it are owned by other processes"
    )


def filesystem_type(path: Path) -> str | None:
    """The file system type of the mount holding ``path`` (Linux), or None if unknown."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    target = str(path.resolve())
    best, best_type = "", None
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > len(best):
            best, best_type = mount, parts[2]
    return best_type


def default_data_dir() -> Path:
    """Where a host keeps its state unless configured otherwise."""
    return Path(jupyter_data_dir()) / "compute-queue"


def host_secret(data_dir: Path) -> bytes:
    """The host's secret for worker tokens, created on first use (readable by its owner only)."""
    path = data_dir / SECRET_NAME
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    value = secrets.token_bytes(32)
    # Written under a temporary name and linked into place: a concurrent reader sees either no
    # secret or a whole one, and of two writers the first wins.
    tmp = data_dir / f".{SECRET_NAME}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value.hex() + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(tmp, path)
    except FileExistsError:
        return bytes.fromhex(path.read_text().strip())
    finally:
        tmp.unlink()
    return value
