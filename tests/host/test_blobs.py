"""Tests for the content-addressed blob stores (real files under tmp_path)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pickle
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jupyter_compute_queue.host.blobs import (
    BlobError,
    BlobHashMismatch,
    BlobInfo,
    BlobNotFound,
    BlobStore,
    BlobTooLarge,
    InvalidBlobKey,
    check_key,
)
from jupyter_compute_queue.host.blobs.local import LocalBlobStore

DAY = 24 * 3600


def key_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def temp_files(root: Path) -> list[Path]:
    return sorted((root / "tmp").iterdir())


async def read_all(store: BlobStore, key: str, chunk_size: int = 256 * 1024) -> bytes:
    return b"".join([chunk async for chunk in store.read(key, chunk_size)])


async def list_all(store: BlobStore, touched_before: float | None = None) -> list[BlobInfo]:
    return [info async for info in store.list(touched_before)]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "blobs"


@pytest.fixture
def store(root: Path) -> LocalBlobStore:
    return LocalBlobStore(root)


def test_package_import_is_light() -> None:
    import jupyter_compute_queue.host.blobs as blobs

    assert "LocalBlobStore" not in blobs.__all__
    assert not hasattr(blobs, "LocalBlobStore")


def test_creating_store_creates_root_and_tmp(root: Path) -> None:
    LocalBlobStore(root)
    assert (root / "tmp").is_dir()
    LocalBlobStore(str(root))  # existing root is fine


async def test_round_trip(store: LocalBlobStore, root: Path) -> None:
    data = b"hello blobs\n" * 1000
    key = key_of(data)
    assert await store.stat(key) is None
    assert not await store.exists(key)
    assert store.local_path(key) is None

    before = time.time()
    info = await store.put(key, data)
    assert info.key == key
    assert info.size == len(data)
    assert before - 2 <= info.touched_at <= time.time() + 2

    assert await store.stat(key) == info
    assert await store.exists(key)
    assert await store.get(key) == data
    assert await read_all(store, key, chunk_size=1000) == data
    assert [len(c) async for c in store.read(key, chunk_size=5000)] == [5000, 5000, 2000]
    assert store.local_path(key) == root / key[:2] / key
    assert (root / key[:2] / key).read_bytes() == data
    assert temp_files(root) == []
    assert await store.download_url(key, "x.txt", "text/plain") is None
    assert await store.upload_url(key) is None
    await store.close()


async def test_empty_blob(store: LocalBlobStore) -> None:
    key = key_of(b"")
    info = await store.put(key, b"")
    assert info.size == 0
    assert await store.get(key) == b""
    assert await read_all(store, key) == b""


@pytest.mark.parametrize("chunk_size", [64 * 1024, 1024 * 1024 + 7])
async def test_streaming_many_chunks(store: LocalBlobStore, root: Path, chunk_size: int) -> None:
    # 64 KiB chunks are written inline, bigger ones in a thread: cover both.
    data = os.urandom(5 * 1024 * 1024)
    key = key_of(data)
    async with await store.open_writer(key) as writer:
        for i in range(0, len(data), chunk_size):
            await writer.write(data[i : i + chunk_size])
        info = await writer.commit()
    assert info == BlobInfo(key, len(data), info.touched_at)
    assert (root / key[:2] / key).read_bytes() == data
    assert await read_all(store, key) == data
    assert temp_files(root) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to tell dirs apart")
async def test_commit_is_durable(
    store: LocalBlobStore, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []  # what each fsync call was given, by path
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    key = key_of(b"durable")
    await store.put(key, b"durable")
    # the file's bytes, then the new prefix directory's entry, then the blob's entry
    assert len(synced) == 3
    assert synced[0].startswith(str(root / "tmp"))
    assert synced[1:] == [str(root), str(root / key[:2])]

    synced.clear()
    other = key_of(b"durable too")
    (root / other[:2]).mkdir(exist_ok=True)
    await store.put(other, b"durable too")
    assert synced[1:] == [str(root / other[:2])]


async def test_hash_mismatch_keeps_nothing(store: LocalBlobStore, root: Path) -> None:
    good, bad = b"expected bytes", b"other bytes"
    key = key_of(good)
    with pytest.raises(BlobHashMismatch) as info:
        await store.put(key, bad)
    assert key in str(info.value)
    assert key_of(bad) in str(info.value)
    assert (info.value.expected, info.value.actual) == (key, key_of(bad))
    assert files_under(root) == []
    assert temp_files(root) == []
    assert not await store.exists(key)
    # the exception survives pickling (e.g. across a process pool)
    again = pickle.loads(pickle.dumps(info.value))
    assert str(again) == str(info.value)


async def test_mismatch_in_writer_then_writer_is_closed(store: LocalBlobStore, root: Path) -> None:
    key = key_of(b"abc")
    writer = await store.open_writer(key)
    await writer.write(b"abd")
    with pytest.raises(BlobHashMismatch):
        await writer.commit()
    assert files_under(root) == []
    with pytest.raises(BlobError):
        await writer.write(b"more")
    with pytest.raises(BlobError):
        await writer.commit()
    await writer.abort()  # still harmless


async def test_max_bytes_exceeded_keeps_nothing(store: LocalBlobStore, root: Path) -> None:
    data = os.urandom(300_000)
    key = key_of(data)
    writer = await store.open_writer(key, max_bytes=len(data) - 1)
    await writer.write(data[:100_000])
    assert len(temp_files(root)) == 1
    with pytest.raises(BlobTooLarge):
        await writer.write(data[100_000:])
    assert files_under(root) == []
    with pytest.raises(BlobError):
        await writer.commit()
    assert not await store.exists(key)

    # exactly max_bytes is allowed
    async with await store.open_writer(key, max_bytes=len(data)) as writer:
        await writer.write(data)
        await writer.commit()
    assert await store.get(key) == data


async def test_negative_max_bytes_rejected(store: LocalBlobStore) -> None:
    with pytest.raises(ValueError):
        await store.open_writer(key_of(b"x"), max_bytes=-1)


async def test_abort_removes_temp_file(store: LocalBlobStore, root: Path) -> None:
    key = key_of(b"abort me")
    writer = await store.open_writer(key)
    await writer.write(b"abort")
    assert len(temp_files(root)) == 1
    await writer.abort()
    assert temp_files(root) == []
    await writer.abort()  # idempotent
    with pytest.raises(BlobError):
        await writer.write(b" me")
    assert not await store.exists(key)


async def test_abort_after_commit_keeps_blob(store: LocalBlobStore) -> None:
    key = key_of(b"kept")
    writer = await store.open_writer(key)
    await writer.write(b"kept")
    info = await writer.commit()
    await writer.abort()
    assert await writer.commit() == info  # a second commit just reports the first
    assert await store.get(key) == b"kept"


async def test_context_manager_aborts_on_exception(store: LocalBlobStore, root: Path) -> None:
    key = key_of(b"boom")
    with pytest.raises(RuntimeError):
        async with await store.open_writer(key) as writer:
            await writer.write(b"bo")
            assert len(temp_files(root)) == 1
            raise RuntimeError("client went away")
    assert files_under(root) == []


async def test_context_manager_aborts_when_not_committed(store: LocalBlobStore, root: Path) -> None:
    key = key_of(b"forgot")
    async with await store.open_writer(key) as writer:
        await writer.write(b"forgot")
    assert files_under(root) == []
    assert not await store.exists(key)


async def test_cancelled_thread_write_cleans_up(store: LocalBlobStore, root: Path) -> None:
    data = os.urandom(32 * 1024 * 1024)  # large: written in a thread
    writer = await store.open_writer(key_of(data))
    task = asyncio.create_task(writer.write(data))
    await asyncio.sleep(0)  # let it start the thread
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await writer.abort()
    # The thread cannot be interrupted; the temp file goes once it finishes.
    for _ in range(1000):
        if not temp_files(root):
            break
        await asyncio.sleep(0.01)
    assert temp_files(root) == []
    assert files_under(root) == []


async def test_writer_rejects_overlapping_calls(store: LocalBlobStore, root: Path) -> None:
    data = os.urandom(8 * 1024 * 1024)
    writer = await store.open_writer(key_of(data + data))
    first = asyncio.create_task(writer.write(data))
    await asyncio.sleep(0)  # the first write is now in its thread
    with pytest.raises(BlobError, match="two coroutines"):
        await writer.write(data)
    await first
    await writer.write(data)
    await writer.commit()
    assert await store.get(key_of(data + data)) == data + data


BAD_KEYS = [
    "A" * 64,  # uppercase
    key_of(b"x").upper(),
    "ab" * 31,  # short
    "a" * 65,  # long
    "",
    "../x",
    "../" + "a" * 61,
    "ab/" + "c" * 61,
    "g" * 64,  # not hex
    key_of(b"x") + "\n",
    " " + key_of(b"x")[1:],
]


def key_calls(store: LocalBlobStore, key: str) -> list[Callable[[], Awaitable[Any]]]:
    async def read() -> None:
        async for _ in store.read(key):
            pass

    async def writer() -> None:
        await store.open_writer(key)

    return [
        writer,
        lambda: store.put(key, b"x"),
        lambda: store.stat(key),
        lambda: store.exists(key),
        read,
        lambda: store.get(key),
        lambda: store.delete(key),
        lambda: store.touch(key),
        lambda: store.download_url(key, "f", "text/plain"),
        lambda: store.upload_url(key),
    ]


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_invalid_keys_rejected_everywhere(
    store: LocalBlobStore, root: Path, key: str
) -> None:
    calls = key_calls(store, key)
    assert len(calls) == 10
    for call in calls:
        with pytest.raises(InvalidBlobKey):
            await call()
    with pytest.raises(InvalidBlobKey):
        store.read(key)  # rejected at call time, before iterating
    with pytest.raises(InvalidBlobKey):
        store.local_path(key)
    assert files_under(root.parent) == []  # nothing written anywhere


def test_check_key() -> None:
    key = key_of(b"x")
    assert check_key(key) == key
    with pytest.raises(InvalidBlobKey, match=re.escape("'../x'")) as info:
        check_key("../x")
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, BlobError)
    with pytest.raises(InvalidBlobKey):
        check_key(123)  # type: ignore[arg-type]


@given(st.binary(max_size=64))
def test_check_key_accepts_every_digest(data: bytes) -> None:
    assert check_key(key_of(data)) == key_of(data)


@given(st.text(max_size=80))
def test_check_key_rejects_non_keys(text: str) -> None:
    is_key = len(text) == 64 and all(c in "0123456789abcdef" for c in text)
    if is_key:
        assert check_key(text) == text
    else:
        with pytest.raises(InvalidBlobKey):
            check_key(text)


async def test_delete(store: LocalBlobStore, root: Path) -> None:
    key = key_of(b"gone soon")
    await store.put(key, b"gone soon")
    assert await store.delete(key) is True
    assert await store.delete(key) is False
    assert await store.stat(key) is None
    assert store.local_path(key) is None
    with pytest.raises(BlobNotFound):
        await store.get(key)
    assert files_under(root) == []


async def test_missing_blob(store: LocalBlobStore) -> None:
    key = key_of(b"never stored")
    with pytest.raises(BlobNotFound) as info:
        async for _ in store.read(key):
            pass
    assert isinstance(info.value, KeyError)
    assert str(info.value) == f"blob {key} not found"
    with pytest.raises(BlobNotFound):
        await store.get(key)
    with pytest.raises(BlobNotFound):
        await BlobStore.get(store, key)  # the default, streaming implementation
    with pytest.raises(BlobNotFound):
        await store.touch(key)
    assert not await store.exists(key)


async def test_get_max_bytes(store: LocalBlobStore) -> None:
    data = b"0123456789" * 100
    key = key_of(data)
    await store.put(key, data)
    assert await store.get(key, max_bytes=len(data)) == data
    with pytest.raises(BlobTooLarge):
        await store.get(key, max_bytes=len(data) - 1)
    # the base class's default, built on read()
    assert await BlobStore.get(store, key, max_bytes=len(data)) == data
    with pytest.raises(BlobTooLarge):
        await BlobStore.get(store, key, max_bytes=len(data) - 1)


async def test_touch_updates_touched_at(store: LocalBlobStore, root: Path) -> None:
    key = key_of(b"touch me")
    await store.put(key, b"touch me")
    old = time.time() - 10 * DAY
    os.utime(root / key[:2] / key, (old, old))
    info = await store.stat(key)
    assert info is not None
    assert info.touched_at == pytest.approx(old)

    before = time.time()
    await store.touch(key)
    info = await store.stat(key)
    assert info is not None
    assert info.touched_at >= before - 2
    assert await store.get(key) == b"touch me"


async def test_list_filters_and_skips_tmp(store: LocalBlobStore, root: Path) -> None:
    blobs = [f"blob {i}".encode() for i in range(5)]
    keys = [key_of(b) for b in blobs]
    for key, data in zip(keys, blobs, strict=True):
        await store.put(key, data)
    old = time.time() - 3 * DAY
    for key in keys[:2]:
        os.utime(root / key[:2] / key, (old, old))

    # things that are not blobs: an unfinished write, stray files and directories
    writer = await store.open_writer(key_of(b"pending"))
    await writer.write(b"pending")
    stale = root / "tmp" / key_of(b"y")
    stale.write_bytes(b"y")
    os.utime(stale, (old, old))
    (root / "README").write_text("not a blob")
    (root / keys[0][:2] / "notes.txt").write_text("not a blob")
    (root / "zz").mkdir()
    (root / "zz" / ("zz" + "0" * 62)).write_text("not hex")
    (root / "00").mkdir(exist_ok=True)
    (root / "00" / ("11" + "0" * 62)).write_text("wrong directory")

    listed = await list_all(store)
    assert sorted(i.key for i in listed) == sorted(keys)
    assert {i.key: i.size for i in listed} == {k: len(b) for k, b in zip(keys, blobs, strict=True)}

    cutoff = time.time() - DAY
    old_ones = await list_all(store, touched_before=cutoff)
    assert sorted(i.key for i in old_ones) == sorted(keys[:2])
    assert all(i.touched_at == pytest.approx(old) for i in old_ones)
    assert await list_all(store, touched_before=old - 1) == []
    await writer.abort()


async def test_list_large_directory(store: LocalBlobStore, root: Path) -> None:
    # More entries in one prefix directory than one listing batch holds.
    (root / "00").mkdir()
    names = {f"00{i:062x}" for i in range(1300)}
    for name in names:
        (root / "00" / name).write_bytes(b"")
    seen = [info.key async for info in store.list()]
    assert len(seen) == len(names)
    assert set(seen) == names


async def test_list_can_stop_early(store: LocalBlobStore) -> None:
    for i in range(3):
        await store.put(key_of(bytes([i])), bytes([i]))
    async for _info in store.list():
        break
    gen = store.list()
    assert isinstance(await anext(gen), BlobInfo)
    await gen.aclose()  # type: ignore[attr-defined]


async def test_read_can_stop_early(store: LocalBlobStore) -> None:
    data = os.urandom(100_000)
    key = key_of(data)
    await store.put(key, data)
    gen = store.read(key, chunk_size=1000)
    assert await anext(gen) == data[:1000]
    await gen.aclose()  # type: ignore[attr-defined]
    assert await store.delete(key)


async def test_put_existing_blob_touches_it(store: LocalBlobStore, root: Path) -> None:
    data = b"same bytes"
    key = key_of(data)
    first = await store.put(key, data)
    path = root / key[:2] / key
    old = time.time() - 5 * DAY
    os.utime(path, (old, old))
    inode = path.stat().st_ino

    before = time.time()
    again = await store.put(key, data)
    assert again.key == first.key
    assert again.size == first.size
    assert again.touched_at >= before - 2
    assert path.stat().st_ino == inode  # touched in place, not rewritten
    assert path.read_bytes() == data
    assert files_under(root) == [path]


async def test_damaged_existing_copy_is_replaced(store: LocalBlobStore, root: Path) -> None:
    data = b"the real bytes"
    key = key_of(data)
    path = root / key[:2] / key
    path.parent.mkdir()
    path.write_bytes(b"trunc")
    await store.put(key, data)
    assert path.read_bytes() == data


async def test_concurrent_writers_same_key(store: LocalBlobStore, root: Path) -> None:
    data = os.urandom(200_000)
    key = key_of(data)

    async def write_one() -> BlobInfo:
        async with await store.open_writer(key) as writer:
            for i in range(0, len(data), 10_000):
                await writer.write(data[i : i + 10_000])
                await asyncio.sleep(0)  # interleave the writers
            return await writer.commit()

    infos = await asyncio.gather(*(write_one() for _ in range(8)))
    assert {(i.key, i.size) for i in infos} == {(key, len(data))}
    assert files_under(root) == [root / key[:2] / key]
    assert (root / key[:2] / key).read_bytes() == data


async def test_sweep_temp(store: LocalBlobStore, root: Path) -> None:
    data = b"slow upload"
    key = key_of(data)
    fresh = await store.open_writer(key)
    await fresh.write(data)
    abandoned = await store.open_writer(key_of(b"abandoned"))
    await abandoned.write(b"aband")
    old = time.time() - 2 * DAY
    fresh_files = temp_files(root)
    assert len(fresh_files) == 2
    (root / "tmp" / "leftover.part").write_bytes(b"x")
    for path in temp_files(root):
        if key not in path.name:
            os.utime(path, (old, old))

    assert await store.sweep_temp(DAY) == 2
    assert [p.name.split(".")[0] for p in temp_files(root)] == [key]
    assert await store.sweep_temp(DAY) == 0
    # the write that was not stale is unharmed
    await fresh.commit()
    assert await store.get(key) == data
    assert await store.sweep_temp(0) == 0
    with pytest.raises(ValueError):
        await store.sweep_temp(-1)
    await abandoned.abort()  # closes its file; the swept temp file is already gone


async def test_commit_after_temp_swept_fails_cleanly(store: LocalBlobStore, root: Path) -> None:
    data = b"too slow"
    writer = await store.open_writer(key_of(data))
    await writer.write(data)
    (tmp,) = temp_files(root)
    os.utime(tmp, (time.time() - 2 * DAY,) * 2)  # as if the client stalled for two days
    assert await store.sweep_temp(DAY) == 1
    with pytest.raises(BlobError):
        await writer.commit()
    assert files_under(root) == []
