"""The host's own worker on queue ``local``: a supervised subprocess (``local_worker`` trait)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jupyter_compute_queue.host.store.sqlite import SqliteStore

from .conftest import Fetch, body, run_job, submit
from .test_worker_process import remove_worker_leftovers


def local_worker_id(app: Any) -> str | None:
    path = Path(app._owned.path) / "local-worker" / "worker-id"
    return path.read_text().strip() if path.exists() else None


@pytest.fixture
def cleanup(jp_serverapp: Any, docker_engine: Any) -> Iterator[None]:
    """Kill any worker process a test leaves behind, and the local worker's containers."""
    app = jp_serverapp.web_app.settings["compute_queue"]
    try:
        yield
    finally:
        worker = app.worker
        if worker is not None:
            worker._stopping = True
            if worker._task is not None:
                worker._task.cancel()
            if worker.process is not None and worker.process.returncode is None:
                worker.process.kill()
        worker_id = local_worker_id(app)
        if worker_id:
            remove_worker_leftovers(docker_engine, worker_id)


async def until(check: Any, timeout: float, what: str) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while not (value := check()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)
    return value


async def until_running(fetch: Fetch, job_id: str) -> str:
    """Wait until the job's run on queue local is in phase running; its run id."""
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        record = body(await fetch("q", "local", "j", job_id, "result.json"))
        assert record["state"] != "Finished", record
        if record["state"] == "Running" and record["phase"] == "running":
            return str(record["runId"])
        assert asyncio.get_running_loop().time() < deadline, f"{job_id} not running in 30s"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("cq_config", [{"local_worker": True}])
async def test_the_local_worker_is_supervised(
    jp_serverapp: Any, fetch: Fetch, test_images: Any, docker_engine: Any, cleanup: None
) -> None:
    app = jp_serverapp.web_app.settings["compute_queue"]
    # pytest-jupyter does not call the extension's start hook: start the worker as it does.
    await app.start_local_worker(jp_serverapp)
    worker = app.worker
    assert worker is not None
    definition = {"image": test_images.busybox, "command": "echo first $JOB_QUEUE"}
    result, logs = await run_job(fetch, definition, queue="local", timeout=60)
    assert result["reason"] == "Success" and "first local" in logs, (result, logs)
    first = worker.process
    assert first is not None and first.returncode is None

    first.kill()  # the worker dies; the Jupyter server does not
    assert await asyncio.wait_for(first.wait(), 10) != 0
    assert (await fetch("healthz")).code == 200
    await until(lambda: worker.starts == 2, 15, "the supervisor started a new worker")
    assert worker.process is not first
    definition = {"image": test_images.busybox, "command": "echo second $JOB_QUEUE"}
    result, logs = await run_job(fetch, definition, queue="local", timeout=60)
    assert result["reason"] == "Success" and "second local" in logs, (result, logs)
    assert result["worker"]["id"] == local_worker_id(app)

    # Stopping the server stops the worker gracefully: a running job is given back (uncounted)
    # and its container removed, within the supervisor's wait (no SIGKILL).
    answer = await submit(fetch, "local", {"image": test_images.busybox, "command": "sleep 60"})
    run_id = await until_running(fetch, answer["jobId"])
    second = worker.process
    assert second is not None
    started = asyncio.get_running_loop().time()
    await app.stop_extension()
    took = asyncio.get_running_loop().time() - started
    assert second.returncode == 0, f"the worker ended with {second.returncode} after {took:.1f}s"
    assert worker._task is not None and worker._task.done()
    assert worker.starts == 2  # and nothing started again
    # The host's store is closed now: read the run from its file.
    store = SqliteStore(Path(app._owned.path) / "state.sqlite")
    await store.open()
    try:
        record = await store.get_run(run_id)
    finally:
        await store.close()
    assert record is not None and record.state.value == "Queued", record
    assert record.lost_count == 0, record
    label = {"label": f"compute-queue.worker={local_worker_id(app)}"}
    assert docker_engine.containers.list(all=True, sparse=True, filters=label) == []


@pytest.mark.parametrize("cq_config", [{"local_worker": "auto"}])
async def test_auto_without_docker_starts_no_worker(
    jp_serverapp: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent.sock")
    app = jp_serverapp.web_app.settings["compute_queue"]
    with caplog.at_level(logging.INFO):
        await app.start_local_worker(jp_serverapp)
    assert app.worker is None
    assert any("no Docker engine answers" in r.getMessage() for r in caplog.records)
