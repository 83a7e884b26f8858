"""Blob retention (SPEC §10) and blob references, on both blob stores: the local one and S3
(moto's server), with a real SQLite store under the service."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from traitlets.config import Config

from jupyter_compute_queue.host.blobs import BlobStore
from jupyter_compute_queue.host.blobs.local import LocalBlobStore
from jupyter_compute_queue.host.logs import LogStore
from jupyter_compute_queue.host.service import BadRequest, QueueService, ServiceConfig
from jupyter_compute_queue.host.store.base import Outcome
from jupyter_compute_queue.host.store.sqlite import SqliteStore
from jupyter_compute_queue.model.runs import OutputRef, Reason

from ..conftest import USER, Clock, connect

GRACE = 60.0


def key_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(params=["local", "s3"])
async def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    store: BlobStore
    if request.param == "s3":
        from jupyter_compute_queue.host.blobs.s3 import S3BlobStore

        bucket = request.getfixturevalue("s3_bucket")
        store = S3BlobStore(config=Config({"S3BlobStore": bucket}))
    else:
        store = LocalBlobStore(tmp_path / "blobs")
    yield store
    await store.close()


async def open_service(
    blobs: BlobStore, root: Path, clock: Any = time.time, **config: Any
) -> QueueService:
    service = QueueService(
        SqliteStore(root / "state.sqlite"),
        LogStore(root / "logs"),
        blobs,
        ServiceConfig(**{"blob_grace_seconds": GRACE, "sweep_batch": 2, **config}),
        clock=clock,
    )
    await service.store.open()
    return service


async def test_unreferenced_blobs_go_after_the_grace_period(
    blobs: BlobStore, tmp_path: Path
) -> None:
    clock = Clock(time.time())
    service = await open_service(blobs, tmp_path, clock)
    data = {name: f"{name} bytes".encode() for name in ("input", "output", "a", "b", "c")}
    for value in data.values():
        await blobs.put(key_of(value), value)
    definition = {
        "image": "x",
        "inputs": {"in.txt": {"type": "key", "value": key_of(data["input"])}},
    }
    answer = await service.submit(USER, "q", definition)
    worker = await connect(service, "w1")
    [assignment] = worker.assigned
    output = {"out.txt": OutputRef(key=key_of(data["output"]), size=len(data["output"]))}
    record = await service.finish(
        "w1", answer["runId"], assignment.fence, Outcome(Reason.SUCCESS, 0, outputs=output)
    )
    assert record.reason is Reason.SUCCESS and set(record.outputs) == {"out.txt"}

    assert await service.sweep() == (0, 0)  # everything was touched within the grace period
    clock.advance(GRACE + 5)
    assert await service.sweep() == (0, 3)  # in batches of two
    left = {info.key async for info in blobs.list()}
    assert left == {key_of(data["input"]), key_of(data["output"])}

    # A submission naming a blob that is gone is refused, naming the field.
    gone = {"image": "x", "inputs": {"d/a.txt": {"type": "key", "value": key_of(data["a"])}}}
    with pytest.raises(BadRequest, match=rf"^inputs\.d/a\.txt: blob {key_of(data['a'])} is not"):
        await service.submit(USER, "q", gone)
    await service.store.close()


async def test_asking_for_a_blob_keeps_it(blobs: BlobStore, tmp_path: Path) -> None:
    """A client told "the host has it" skips its upload: asking counts as a touch, so the
    sweeper leaves the blob for the submission that follows (real time, a 3 s period: S3
    keeps LastModified to the second)."""
    service = await open_service(blobs, tmp_path, blob_grace_seconds=3.0)
    asked, forgotten = b"asked about", b"forgotten"
    for value in (asked, forgotten):
        await blobs.put(key_of(value), value)
    deadline = time.monotonic() + 15
    while await blobs.stat(key_of(forgotten)) is not None:
        assert time.monotonic() < deadline, "the unreferenced blob was never swept"
        assert await service.has_blob(key_of(asked))
        await service.sweep()
        await asyncio.sleep(0.1)
    assert await blobs.stat(key_of(asked)) is not None
    await service.store.close()


async def test_outputs_that_are_not_stored_fail_the_run(blobs: BlobStore, tmp_path: Path) -> None:
    service = await open_service(blobs, tmp_path)
    stored = b"stored output"
    await blobs.put(key_of(stored), stored)
    answer = await service.submit(USER, "q", {"image": "x"})
    worker = await connect(service, "w1")
    [assignment] = worker.assigned
    outputs = {
        "ok.txt": OutputRef(key=key_of(stored), size=len(stored)),
        "lost.txt": OutputRef(key=key_of(b"never uploaded"), size=14),
    }
    record = await service.finish(
        "w1", answer["runId"], assignment.fence, Outcome(Reason.SUCCESS, 0, outputs=outputs)
    )
    assert record.reason is Reason.ERROR
    assert record.message == "outputs not stored on the host: lost.txt"
    assert set(record.outputs) == {"ok.txt"}
    await service.store.close()
