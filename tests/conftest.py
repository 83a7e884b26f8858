"""Shared fixtures: a real queue service on a real SQLite store, log files and blob folder."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from jupyter_compute_queue.host.access import Identity
from jupyter_compute_queue.host.blobs.local import LocalBlobStore
from jupyter_compute_queue.host.logs import LogStore
from jupyter_compute_queue.host.service import QueueService, ServiceConfig
from jupyter_compute_queue.host.store.base import Assignment, WorkerInfo
from jupyter_compute_queue.host.store.sqlite import SqliteStore
from jupyter_compute_queue.model.capacity import Capacity

pytest_plugins = ["tests.docker_env", "tests.s3_env"]
USER = Identity("user", "alice")


class Clock:
    """A clock the test moves by hand, so leases and retention need no sleeping."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class ScriptedWorker:
    """A worker connected through the service's Python API: records what it is sent."""

    info: WorkerInfo
    assigned: list[Assignment] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)

    async def deliver(self, assignment: Assignment) -> None:
        self.assigned.append(assignment)

    async def stop(self, run_id: str) -> None:
        self.stopped.append(run_id)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_service(tmp_path: Path, clock: Clock) -> Callable[..., QueueService]:
    def make(**config: object) -> QueueService:
        root = tmp_path / f"host{len(list(tmp_path.iterdir()))}"
        return QueueService(
            SqliteStore(root / "state.sqlite"),
            LogStore(root / "logs", max_bytes=64 * 1024),
            LocalBlobStore(root / "blobs"),
            ServiceConfig(**config),  # type: ignore[arg-type]
            clock=clock,
        )

    return make


@pytest.fixture
async def service(make_service: Callable[..., QueueService]) -> AsyncIterator[QueueService]:
    svc = make_service()
    await svc.store.open()
    yield svc
    await svc.store.close()


async def connect(
    svc: QueueService,
    worker_id: str,
    queues: tuple[str, ...] = ("q",),
    cpus: float = 1,
    **kw: object,
) -> ScriptedWorker:
    """Connect a scripted worker with its whole capacity free."""
    info = WorkerInfo(worker_id, queues, Capacity(cpus), **kw)  # type: ignore[arg-type]
    worker = ScriptedWorker(info)
    await svc.connect_worker(USER, info, [], worker.deliver, worker.stop)
    await svc.report_free(worker_id, info.capacity)
    return worker
