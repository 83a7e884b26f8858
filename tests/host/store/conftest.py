"""Helpers for the store tests: a real SQLite store under tmp_path, and short ways to drive it.

Time is always a parameter of the store, so every helper takes ``now`` and nothing sleeps.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from jupyter_compute_queue.host.store.base import (
    Assignment,
    Change,
    Outcome,
    SubmitRequest,
    SubmitResult,
    WorkerInfo,
)
from jupyter_compute_queue.host.store.sqlite import SqliteStore
from jupyter_compute_queue.model.capacity import Capacity
from jupyter_compute_queue.model.jobs import JobDefinition, job_id, parse_definition
from jupyter_compute_queue.model.runs import DEFAULT_NAMESPACE, Reason, RunRecord

#: The epoch time every test starts at.
T0 = 1_800_000_000.0
LEASE = 30.0
MAX_LOST = 3


def definition(n: int = 0, **fields: Any) -> JobDefinition:
    """A distinct job per ``n``; ``fields`` are merged into the wire definition."""
    return parse_definition({"image": "busybox:1.36", "command": ["echo", str(n)], **fields})


def request(
    job: int | JobDefinition = 0,
    queue: str = "q",
    namespace: str = DEFAULT_NAMESPACE,
    **kw: Any,
) -> SubmitRequest:
    """A submission of job ``n`` (or of a given definition)."""
    defn = definition(job) if isinstance(job, int) else job
    return SubmitRequest(queue, defn, job_id(defn), namespace, **kw)


async def submit(
    store: SqliteStore,
    job: int | JobDefinition = 0,
    queue: str = "q",
    namespace: str = DEFAULT_NAMESPACE,
    now: float = T0,
    **kw: Any,
) -> SubmitResult:
    """Submit one request and return its result."""
    [result] = await store.submit([request(job, queue, namespace, **kw)], now)
    return result


def worker_info(
    worker_id: str = "w1",
    queues: tuple[str, ...] = ("q",),
    *,
    cpus: float = 4,
    memory: int | None = None,
    gpus: int = 0,
    tags: frozenset[str] | set[str] = frozenset(),
    max_duration: int = 3600,
) -> WorkerInfo:
    return WorkerInfo(
        worker_id,
        queues,
        Capacity(cpus, memory, gpus),
        version="1.0",
        tags=frozenset(tags),
        max_duration=max_duration,
    )


async def register(
    store: SqliteStore, worker_id: str = "w1", now: float = T0, **kw: Any
) -> WorkerInfo:
    """Register a worker holding nothing, with a lease of LEASE seconds from ``now``."""
    info = worker_info(worker_id, **kw)
    registration = await store.register_worker(info, [], now, LEASE, MAX_LOST)
    assert registration.kept == [] and registration.lost == []
    return info


async def claim(
    store: SqliteStore, worker: WorkerInfo, now: float = T0, free: Capacity | None = None
) -> Assignment | None:
    """A claim with the worker's whole capacity free (unless ``free`` says otherwise)."""
    return await store.claim(worker, free or worker.capacity, now)


async def finish(
    store: SqliteStore,
    assignment: Assignment,
    worker: WorkerInfo,
    reason: Reason = Reason.SUCCESS,
    now: float = T0,
    **kw: Any,
) -> Change:
    outcome = Outcome(reason, exit_code=0 if reason is Reason.SUCCESS else 1, **kw)
    return await store.finish(
        assignment.record.run_id, assignment.fence, worker.worker_id, outcome, now
    )


async def complete(
    store: SqliteStore,
    job: int | JobDefinition = 0,
    queue: str = "q",
    reason: Reason = Reason.SUCCESS,
    now: float = T0,
    worker_id: str = "finisher",
    **kw: Any,
) -> RunRecord:
    """Submit (or join) a job, have a fresh worker claim it and finish it with ``reason``.

    The queue must hold no older queued run, so that the claim picks this one.
    """
    submitted = await submit(store, job, queue, now=now, **kw)
    worker = await register(store, worker_id, now=now, queues=(queue,))
    assignment = await claim(store, worker, now)
    assert assignment is not None
    assert assignment.record.run_id == submitted.record.run_id
    change = await finish(store, assignment, worker, reason, now=now)
    assert change.changed
    return change.record


StoreFactory = Callable[..., Awaitable[SqliteStore]]


@pytest.fixture
async def open_store(tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """Opens stores (by default on the same file) and closes them all at the end."""
    opened: list[SqliteStore] = []

    async def make(path: Path | None = None) -> SqliteStore:
        store = SqliteStore(path or tmp_path / "state.sqlite")
        opened.append(store)  # closed even when opening fails half-way
        await store.open()
        return store

    yield make
    for store in opened:
        await store.close()  # closing twice is harmless


@pytest.fixture
async def store(open_store: StoreFactory) -> SqliteStore:
    return await open_store()
