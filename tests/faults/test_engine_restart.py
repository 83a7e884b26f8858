"""The Docker engine restarted under a running worker: the worker comes through it, the run it
interrupted goes back to the queue (counted as lost) and then finishes, and the worker keeps
serving.

The engine is a second dockerd of the test's own (``second_engine``), so the machine's engine
and every other test are untouched."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tests.docker_env import ImageNames
from tests.worker.conftest import Fetch, submit, unique_id, wait_result

from .conftest import Engine, Workers, run_record, until, worker_env


async def test_the_engine_restarts_under_a_running_worker(
    host_api: str,
    host_token: str,
    fetch: Fetch,
    workers: Workers,
    second_engine: Engine,
    test_images: ImageNames,
) -> None:
    worker = unique_id("engine")
    url = host_api.removesuffix("compute-queue/")
    # No network of its own: the engines of this machine share few address pools.
    workers.start(
        worker, url, host_token, "--cpus", "2", "--network", "none",
        env=worker_env(DOCKER_HOST=second_engine.url),
    )  # fmt: skip
    await workers.connected(fetch, worker)
    definition = {"image": test_images.busybox, "command": "echo started; sleep 4; echo done"}
    job = (await submit(fetch, "q", definition))["jobId"]

    async def running() -> dict[str, Any] | None:
        record = await run_record(fetch, job)
        assert record["state"] != "Finished", (
            record["reason"],
            record["message"],
            workers.log(worker),
        )
        return record if record.get("phase") == "running" else None

    first = await until(running, 30, "the run is running")
    assert first["worker"]["id"] == worker and first["attempt"] == 1, first

    started = time.monotonic()
    await second_engine.terminate()  # the engine stops its containers, then itself
    await second_engine.start()
    down = time.monotonic() - started

    result = await wait_result(fetch, "q", job, timeout=60)
    assert result["reason"] == "Success", (result, workers.log(worker))
    # The same run, assigned again: given back counted as lost (as when a worker dies: a job
    # that brings the engine down every time ends WorkerLost at max_lost, not in a loop).
    assert result["runId"] == first["runId"]
    assert result["attempt"] == 2 and result["lostCount"] == 1, result
    assert result["worker"]["id"] == worker
    logs = (await fetch("q", "q", "j", job, "logs")).body.decode()
    assert logs.count("started") == 2 and logs.count("done") == 1, logs
    assert workers.alive(worker), workers.log(worker)

    # It keeps serving on the restarted engine, and left nothing behind there.
    again = (await submit(fetch, "q", {"image": test_images.busybox, "command": "echo again"}))[
        "jobId"
    ]
    second = await wait_result(fetch, "q", again, timeout=60)
    assert second["reason"] == "Success" and second["attempt"] == 1, second
    assert second["worker"]["id"] == worker
    client = second_engine.client()
    try:

        async def no_leftovers() -> bool:
            return not await asyncio.to_thread(client.containers.list, all=True, sparse=True)

        await until(no_leftovers, 30, "the worker removed the interrupted run's container")
    finally:
        client.close()
    print(f"engine down and up again in {down:.1f}s")
