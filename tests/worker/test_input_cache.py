"""Cached inputs stay the cache's (SPEC §6): a run gets its own copy of each ``key`` and ``url``
input, so what one job does to its ``/inputs`` never reaches a later job, on any queue.

The jobs run as root (``container_user="image"`` with the root busybox image), which ignores
file modes: the strongest case. Workers use ``network="none"``, so no Docker network is made.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import uuid
from pathlib import Path
from typing import Any

import pytest

from jupyter_compute_queue.worker import content_cache
from jupyter_compute_queue.worker.content_cache import PRUNE_GRACE, ContentCache
from jupyter_compute_queue.worker.transfer import Transfers

from .conftest import Fetch, StartWorker, run_job, unique_id

TAMPER = "; ".join(
    [
        "echo uid=$(id -u)",
        # Through a hard link each of these would reach the cache's file: chmod changes the
        # inode's mode, and the shell's ">" truncates and rewrites the file in place.
        "chmod 666 /inputs/k.txt /inputs/u.txt",
        "echo tampered > /inputs/k.txt",
        "echo tampered > /inputs/u.txt",
        "echo mode=$(stat -c %a /inputs/k.txt)",
        "echo now=$(cat /inputs/k.txt)",
    ]
)


async def test_a_job_cannot_change_a_cached_input_for_later_jobs(
    fetch: Fetch,
    start_worker: StartWorker,
    host_api: str,
    test_images: Any,
    tmp_path: Path,
) -> None:
    key_bytes = f"original key input {uuid.uuid4().hex}\n".encode()
    url_bytes = f"original url input {uuid.uuid4().hex}\n".encode()
    key, url_key = (hashlib.sha256(data).hexdigest() for data in (key_bytes, url_bytes))
    for blob_key, data in ((key, key_bytes), (url_key, url_bytes)):
        assert (await fetch("f", blob_key, method="PUT", body=data)).code == 201
    inputs = {
        "k.txt": {"type": "key", "value": key},
        "u.txt": {"type": "url", "value": f"{host_api}f/{url_key}"},
    }
    worker = unique_id("inc")
    await start_worker(worker, queues=("q", "r"), network="none", container_user="image")
    image = test_images.busybox

    result, logs = await run_job(fetch, {"image": image, "command": TAMPER, "inputs": inputs})
    assert result["reason"] == "Success", (result, logs)
    assert "uid=0" in logs and "mode=666" in logs and "now=tampered" in logs, logs

    read = "cat /inputs/k.txt /inputs/u.txt"
    result, logs = await run_job(fetch, {"image": image, "command": read, "inputs": inputs}, "r")
    assert result["reason"] == "Success", (result, logs)
    assert key_bytes.decode() in logs and url_bytes.decode() in logs, logs
    assert "tampered" not in logs, logs

    # The cache kept both blobs (nothing was downloaded twice for the key), unchanged.
    cache = ContentCache(tmp_path / f"worker-{worker}" / "cache")
    for blob_key in (key, url_key):
        path = cache.path(blob_key)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == blob_key
        assert stat.S_IMODE(path.stat().st_mode) == 0o444


@pytest.fixture
def cache(tmp_path: Path) -> ContentCache:
    return ContentCache(tmp_path / "cache")


def cached(cache: ContentCache, tmp_path: Path, data: bytes) -> str:
    src = tmp_path / "src"
    src.write_bytes(data)
    return cache.add_file(src)


def test_a_run_gets_its_own_writable_copy(cache: ContentCache, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)  # several chunks and a ragged end
    key = cached(cache, tmp_path, data)
    dest = tmp_path / "run" / "inputs" / "deep" / "big.bin"
    cache.link_into(key, dest, copy=True)
    assert dest.read_bytes() == data
    assert dest.stat().st_ino != cache.path(key).stat().st_ino
    assert stat.S_IMODE(dest.stat().st_mode) & 0o200  # the run's own: writable
    with dest.open("r+b") as file:
        file.write(b"changed")
    assert hashlib.sha256(cache.path(key).read_bytes()).hexdigest() == key
    cache.link_into(key, dest, copy=True)  # replaces what is there
    assert dest.read_bytes() == data
    empty = cached(cache, tmp_path, b"")
    cache.link_into(empty, tmp_path / "run" / "empty", copy=True)
    assert (tmp_path / "run" / "empty").read_bytes() == b""


def test_the_copy_falls_back_where_the_kernel_cannot_help(
    cache: ContentCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No reflink (most file systems: EOPNOTSUPP), then no copy_file_range (old kernels:
    ENOSYS; some file system pairs: EXDEV, also after part of the file went over): a plain
    copy, with the same bytes."""
    data = os.urandom(1024 * 1024 + 5)
    key = cached(cache, tmp_path, data)
    calls: list[str] = []

    def no_clone(fd: int, request: int, arg: int) -> int:
        calls.append("ioctl")
        raise OSError(errno.EOPNOTSUPP, "not supported")

    real_copy_file_range = os.copy_file_range

    def half_then_fail(src: int, dst: int, count: int) -> int:
        calls.append("copy_file_range")
        if len(calls) == 2:
            return real_copy_file_range(src, dst, min(count, 4096))
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(content_cache.fcntl, "ioctl", no_clone)
    monkeypatch.setattr(content_cache.os, "copy_file_range", half_then_fail)
    dest = tmp_path / "run" / "a.bin"
    cache.link_into(key, dest, copy=True)
    assert dest.read_bytes() == data
    assert calls == ["ioctl", "copy_file_range", "copy_file_range"], calls

    def unavailable(src: int, dst: int, count: int) -> int:
        raise OSError(errno.ENOSYS, "no such system call")

    monkeypatch.setattr(content_cache.os, "copy_file_range", unavailable)
    cache.link_into(key, dest, copy=True)
    assert dest.read_bytes() == data


# --- pruning ---------------------------------------------------------------------------------


def used_at(cache: ContentCache, key: str, seconds_ago: float) -> None:
    """Pretend the cached file was last used ``seconds_ago``."""
    when = os.path.getmtime(cache.path(key)) - seconds_ago
    os.utime(cache.path(key), (when, when))


def test_past_its_cap_the_cache_drops_what_was_used_longest_ago(tmp_path: Path) -> None:
    cache = ContentCache(tmp_path / "cache", max_bytes=10_000)
    old, older, oldest = (cached(cache, tmp_path, bytes([n]) * 3000) for n in (1, 2, 3))
    used_at(cache, old, PRUNE_GRACE + 100)
    used_at(cache, older, PRUNE_GRACE + 200)
    used_at(cache, oldest, PRUNE_GRACE + 300)
    cache.link_into(older, tmp_path / "run" / "a", copy=True)  # used now: the newest again
    assert cache.total == 9000
    fresh = cached(cache, tmp_path, b"f" * 3000)  # 12,000 > 10,000: down to 9,000 at most
    assert not cache.has(oldest)
    assert cache.has(old) and cache.has(older) and cache.has(fresh)
    newest = cached(cache, tmp_path, b"n" * 3000)  # the next one used longest ago goes
    assert not cache.has(old)
    assert cache.has(older) and cache.has(fresh) and cache.has(newest)
    assert cache.total == 9000 == sum(p.stat().st_size for p in cache.root.glob("??/*"))
    # A new cache over the same folder counts what is there.
    assert ContentCache(tmp_path / "cache", max_bytes=10_000).total == 9000


def test_files_used_lately_stay_even_past_the_cap(tmp_path: Path) -> None:
    cache = ContentCache(tmp_path / "cache", max_bytes=1000)
    first = cached(cache, tmp_path, b"a" * 800)
    second = cached(cache, tmp_path, b"b" * 800)  # past the cap, but both used just now
    assert cache.has(first) and cache.has(second) and cache.total == 1600
    used_at(cache, first, PRUNE_GRACE + 1)
    assert cache.prune() == 800
    assert not cache.has(first) and cache.has(second)


def test_leftover_partial_downloads_go_at_start(tmp_path: Path) -> None:
    cache = ContentCache(tmp_path / "cache")
    stale, recent = cache.tmp_dir / "fetch-a.part", cache.tmp_dir / "fetch-b.part"
    stale.write_bytes(b"x")
    recent.write_bytes(b"y")
    os.utime(stale, (1, 1))
    ContentCache(tmp_path / "cache")
    assert not stale.exists() and recent.exists()


async def test_a_file_pruned_after_it_was_found_is_fetched_again(
    fetch: Fetch, host_api: str, host_token: str, tmp_path: Path
) -> None:
    data = f"pruned meanwhile {uuid.uuid4().hex}".encode()
    key = hashlib.sha256(data).hexdigest()
    assert (await fetch("f", key, method="PUT", body=data)).code == 201
    cache = ContentCache(tmp_path / "cache")
    transfers = Transfers(host_api, host_token, cache)
    await transfers.fetch(f"f/{key}", tmp_path / "first", key)

    class Racing(ContentCache):
        """Finds the file, then loses it to a prune before the copy."""

        def has(self, sha256: str) -> bool:
            found = super().has(sha256)
            self.path(sha256).unlink()
            return found

    racing = Transfers(host_api, host_token, Racing(tmp_path / "cache"))
    await racing.fetch(f"f/{key}", tmp_path / "second", key, copy=True)
    assert (tmp_path / "second").read_bytes() == data and cache.has(key)
