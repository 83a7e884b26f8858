"""Outputs the worker cannot read, copied out of the exited container by the Docker engine.

With ``--container-user image`` a job runs as whatever uid its image names, and what it leaves
in ``/outputs`` is that uid's: a file it made 0600, or a folder 0700, is closed to a worker that
is not root. (A root worker reads everything: for it :func:`unreadable` is always False and
nothing here runs.) The engine reads as root, and copies from a stopped container's mounts
too: ``get_archive("/outputs")`` of the exited container is unpacked into a folder of the
worker's own, and the outputs are uploaded from there.

The archive is the job's making, so it is unpacked with care: regular files only (no links,
devices or fifos, as :func:`~.prepare.output_files` takes only regular files), no path that
leaves the folder, and no more bytes in all than the output cap.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import requests.exceptions

__all__ = ["CopyError", "TooLarge", "copy_out", "unreadable"]


class CopyError(Exception):
    """The outputs could not be copied out (the engine refused, a bad archive, a full disk)."""


class TooLarge(CopyError):
    """The outputs hold more than the cap."""


def unreadable(outputs: Path) -> bool:
    """Whether anything under ``outputs`` is closed to this process (links are not followed:
    they are never uploaded)."""
    closed = False

    def refused(_: OSError) -> None:
        nonlocal closed
        closed = True

    for root, dirs, files in os.walk(outputs, onerror=refused):
        for name in dirs:
            path = os.path.join(root, name)
            if not os.path.islink(path) and not os.access(path, os.R_OK | os.X_OK):
                return True
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path) and not os.access(path, os.R_OK):
                return True
    return closed


def copy_out(container: Any, dest: Path, cap: int) -> Path:
    """Unpack the regular files of the exited ``container``'s ``/outputs`` into ``dest`` (made
    here, the worker's own); returns ``dest``. TooLarge past ``cap`` bytes in all, CopyError
    for other failures; an engine that stops answering raises as anywhere else (requests'
    ConnectionError: the runner's RuntimeLost)."""
    try:
        return _unpack(container, dest, cap)
    except requests.exceptions.ConnectionError:
        raise
    except (OSError, tarfile.TarError) as exc:  # the SDK's APIError is an OSError too
        raise CopyError(str(exc)) from exc


def _unpack(container: Any, dest: Path, cap: int) -> Path:
    chunks, _ = container.get_archive("/outputs")
    dest.mkdir(mode=0o700)
    total = 0
    with tarfile.open(fileobj=io.BufferedReader(_Chunks(chunks)), mode="r|") as tar:
        for member in tar:
            name = PurePosixPath(member.name)
            parts = name.parts[1:]  # below the archive's top folder, "outputs"
            if not member.isreg() or name.is_absolute() or not parts or ".." in parts:
                continue
            total += member.size
            if total > cap:
                raise TooLarge(f"/outputs holds more than the cap of {cap} bytes")
            target = dest.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None  # a regular file has its bytes
            with source, open(target, "xb") as out:
                shutil.copyfileobj(source, out)
    return dest


class _Chunks(io.RawIOBase):
    """The engine's archive (an iterator of byte chunks) as a file to read."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._chunk = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._chunk:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._chunk = memoryview(chunk)
        n = min(len(buffer), len(self._chunk))
        buffer[:n] = self._chunk[:n]
        self._chunk = self._chunk[n:]  # a view: no bytes copied
        return n
