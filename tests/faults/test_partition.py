"""A worker cut off from its host for longer than its lease (SPEC §5): the host requeues the
run, the worker stops the container on its own clock, and its late result is refused."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.docker_env import ImageNames
from tests.worker.conftest import Fetch, submit, unique_id, wait_result

from .conftest import Workers, run_record, until
from .proxy import Proxy

LEASE = 2.0


@pytest.mark.parametrize("cq_config", [{"lease_seconds": LEASE}])
async def test_a_cut_off_worker_stops_its_run_and_its_late_result_is_refused(
    jp_http_port: int,
    jp_base_url: str,
    host_token: str,
    fetch: Fetch,
    workers: Workers,
    make_proxy: Callable[..., Awaitable[Proxy]],
    docker_engine: Any,
    test_images: ImageNames,
) -> None:
    proxy = await make_proxy(jp_http_port, tap=True)
    worker = unique_id("cut")
    url = f"http://127.0.0.1:{proxy.port}{jp_base_url}"
    workers.start(worker, url, host_token, "--cpus", "2", "--network", "none")
    await workers.connected(fetch, worker)
    definition = {"image": test_images.busybox, "command": "echo run $JOB_RUN_ID; sleep 5"}
    job = (await submit(fetch, "q", definition))["jobId"]

    async def running() -> dict[str, Any] | None:
        record = await run_record(fetch, job)
        assert record["state"] != "Finished", record
        return record if record.get("phase") == "running" else None

    run_id = (await until(running, 30, "the run is running"))["runId"]
    label = {"label": f"compute-queue.run={run_id}"}

    def containers() -> list[Any]:
        return list(docker_engine.containers.list(all=True, sparse=True, filters=label))

    assert await asyncio.to_thread(containers)

    proxy.blackhole()
    cut = time.monotonic()

    # The worker hears nothing from the host: on its own clock it stops the container (the
    # host could not have told it: every byte is dropped), once its lease may have passed.
    async def container_gone() -> bool:
        return not await asyncio.to_thread(containers)

    await until(container_gone, 4 * LEASE, "the cut-off worker stops its container")
    took = time.monotonic() - cut
    # Counted from the last heartbeat answered before the cut (at most a sixth of a lease
    # earlier), never before the lease could pass.
    assert took > LEASE * 0.75, f"stopped {took:.1f}s after the cut"

    # The host hears nothing for a lease: the run goes back to the queue, counted as lost.
    async def requeued() -> dict[str, Any] | None:
        record = await run_record(fetch, job)
        return record if record["state"] == "Queued" else None

    record = await until(requeued, 4 * LEASE, "the host requeues the run")
    assert record["lostCount"] == 1 and record["attempt"] == 1, record
    assert proxy.blackholed and proxy.dropped > 0
    assert workers.alive(worker), workers.log(worker)

    proxy.resume()
    resumed = time.monotonic()

    # Once the path is back, the worker's late result for the old assignment reaches the host,
    # which refuses it: that run is no longer this worker's under fence 1.
    def mine(kind: str, direction: str = "down") -> list[dict[str, Any]]:
        return [
            m
            for m in proxy.received(direction, kind, since=resumed)  # type: ignore[arg-type]
            if m.get("runId") == run_id and m.get("fence") == 1
        ]

    async def refused() -> list[dict[str, Any]]:
        return mine("conflict")

    conflicts = await until(refused, 30, "the host refuses the late result")
    late = mine("result", "up")
    assert late, proxy.received("up", since=resumed)
    assert late[0]["reason"] == "Cancelled" and "lease" in late[0]["message"], late
    assert "fence 1" in conflicts[0]["error"], conflicts

    # The run itself goes on under a new fence and is accepted once, from that fence only.
    result = await wait_result(fetch, "q", job, timeout=60)
    assert result["reason"] == "Success", result
    assert result["attempt"] == 2 and result["lostCount"] == 1, result
    accepted = [m for m in proxy.received("down", "accepted") if m["runId"] == run_id]
    assert accepted and {m["fence"] for m in accepted} == {2}, accepted
    assert all(m["run"]["finishedAt"] == result["finishedAt"] for m in accepted), accepted
