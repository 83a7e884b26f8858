"""A build context given as an archive URL (``.tar.gz``, ``.tgz``, ``.tar``, ``.zip``): fetched
to a file and unpacked, within limits.

The URL is a job's, so the archive is anyone's: it was read whole into memory, and unpacked
whatever it held. A worker lent to a public queue should not run out of memory or disk because
a job named a large archive or a small one that unpacks to a lot (a "zip bomb"). So: the download
is streamed to a file and stops at ``MAX_ARCHIVE_BYTES``; the archive's members are counted
before anything is written, by the sizes their headers declare (which is what extraction
writes: tarfile copies exactly the declared size, zipfile stops at it), against
``MAX_UNPACKED_BYTES`` and ``MAX_MEMBERS``.
"""

from __future__ import annotations

import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from .fetch_policy import FetchPolicy, FetchRefused, checked_opener

__all__ = ["MAX_ARCHIVE_BYTES", "MAX_MEMBERS", "MAX_UNPACKED_BYTES", "ContextError", "unpack"]

#: The archive as downloaded.
MAX_ARCHIVE_BYTES = 1024**3
#: All its files once unpacked.
MAX_UNPACKED_BYTES = 4 * 1024**3
#: Files, folders and links in it.
MAX_MEMBERS = 100_000
_CHUNK = 256 * 1024


class ContextError(Exception):
    """The context cannot be used; the message says why, for the job's author."""


def is_archive(url: str) -> bool:
    path = url.split("?", 1)[0].lower()
    return path.endswith((".tar.gz", ".tgz", ".tar", ".zip"))


def unpack(url: str, dest: Path, policy: FetchPolicy | None = None) -> None:
    """Fetch the archive at ``url`` (through ``policy``) and unpack it into ``dest``; a single
    top folder (GitHub's archives) is unwrapped. ContextError when it cannot be."""
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix="archive-") as scratch:
        archive = Path(scratch) / "context"
        _download(url, archive, policy)
        try:
            if url.split("?", 1)[0].lower().endswith(".zip"):
                _unzip(archive, dest, url)
            else:
                _untar(archive, dest, url)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
            raise ContextError(f"{_plain(url)} is not a readable archive: {exc}") from None
    _strip_single_folder(dest)


def _download(url: str, target: Path, policy: FetchPolicy | None) -> None:
    # http(s) only: checked by the job model; the policy checks where it may connect
    opener = checked_opener(policy) if policy is not None else urllib.request.build_opener()
    try:
        with opener.open(url, timeout=120) as response, target.open("wb") as file:
            size = 0
            while chunk := response.read(_CHUNK):
                size += len(chunk)
                if size > MAX_ARCHIVE_BYTES:
                    raise ContextError(
                        f"{_plain(url)} is larger than {_gib(MAX_ARCHIVE_BYTES)}, the most a "
                        "worker fetches for a build context"
                    )
                file.write(chunk)
    except FetchRefused as exc:
        exc.requested = url
        raise ContextError(str(exc)) from None


def _check(url: str, members: int, total: int) -> None:
    if members > MAX_MEMBERS:
        raise ContextError(
            f"{_plain(url)} holds more than {MAX_MEMBERS:,} entries, the most a build context may"
        )
    if total > MAX_UNPACKED_BYTES:
        raise ContextError(
            f"{_plain(url)} unpacks to more than {_gib(MAX_UNPACKED_BYTES)}, the most a build "
            "context may"
        )


def _untar(archive: Path, dest: Path, url: str) -> None:
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        _check(url, len(members), sum(m.size for m in members if m.isfile()))
        # "data": no absolute paths, no escaping links, no devices, no setuid bits.
        tar.extractall(dest, filter="data")


def _unzip(archive: Path, dest: Path, url: str) -> None:
    with zipfile.ZipFile(archive) as zipped:
        infos = zipped.infolist()
        _check(url, len(infos), sum(i.file_size for i in infos))
        root = dest.resolve()
        for info in infos:
            target = (dest / info.filename).resolve()
            if not target.is_relative_to(root):
                raise ContextError(f"the archive member {info.filename!r} escapes the context")
        zipped.extractall(dest)


def _strip_single_folder(dest: Path) -> None:
    """GitHub-style archives wrap everything in one top folder: use its inside as the context."""
    entries = list(dest.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        inner = entries[0]
        for child in inner.iterdir():
            shutil.move(str(child), dest / child.name)
        inner.rmdir()


def _plain(url: str) -> str:
    """The URL without its query (presigned URLs carry secrets there)."""
    return url.split("?", 1)[0]


def _gib(size: int) -> str:
    if size >= 1024**3:
        return f"{size / 1024**3:g} GiB"
    return f"{size / 1024**2:g} MiB"
