"""Cancel latency: from the REST cancel until the run's container is gone from the Docker engine
(polled by the run's label), for a running ``sleep 3600`` on a real worker process. Baseline:
the Docker SDK stopping and removing the same container directly (SIGTERM, wait, remove: the
worker's way, without the queue)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from . import docker_direct
from .common import Figure, Settings, median, ms, percentile, say
from .host import Host, Http, QueueWatch, stop_process, wait_workers, worker_process

QUEUE = "cancel"
POLL = 0.01


def _containers(client: Any, run_id: str) -> list[dict[str, Any]]:
    """The run's containers, as the engine lists them (one call, no inspect per container)."""
    found: list[dict[str, Any]] = client.api.containers(
        all=True, filters={"label": f"compute-queue.run={run_id}"}
    )
    return found


def direct(client: Any) -> float:
    container = docker_direct.create(client, ["sleep", "3600"])
    container.start()
    start = time.perf_counter()
    container.kill(signal="SIGTERM")
    container.wait()
    container.remove(force=True)
    return time.perf_counter() - start


async def through_host(client: Any, http: Http, watch: QueueWatch) -> float:
    envelope = {"definition": docker_direct.definition(["sleep", "3600"]), "rerun": True}
    answer = await http.json("POST", f"compute-queue/q/{QUEUE}", envelope)
    run_id, job_id = answer["runId"], answer["jobId"]
    await asyncio.wait_for(watch.until(run_id, lambda r: r.get("phase") == "running"), 120)
    deadline = time.monotonic() + 60
    while not any(
        c["State"] == "running" for c in await asyncio.to_thread(_containers, client, run_id)
    ):
        if time.monotonic() > deadline:
            raise RuntimeError(f"run {run_id}'s container did not start")
        await asyncio.sleep(POLL)
    start = time.perf_counter()
    await http.json("POST", f"compute-queue/q/{QUEUE}/j/{job_id}/cancel")
    while await asyncio.to_thread(_containers, client, run_id):
        if time.perf_counter() - start > 60:
            raise RuntimeError(f"run {run_id}'s container is still there after 60 s")
        await asyncio.sleep(POLL)
    return time.perf_counter() - start


async def measure(settings: Settings) -> list[Figure]:
    n = settings.size(20, 5, 1)
    client = docker_direct.client()
    async with Host(settings.workdir / "cancel-host") as host:
        http = Http(host.port)
        worker = worker_process(
            host,
            [QUEUE],
            settings.workdir / "cancel-worker",
            "--network",
            "none",
            "--id",
            "bench-cancel",
        )
        watch = await QueueWatch(host, QUEUE).open()
        try:
            await wait_workers(http, QUEUE, 1)
            ours: list[float] = []
            base: list[float] = []
            say(f"cancel: {n} interleaved pairs")
            for _ in range(n):
                ours.append(await through_host(client, http, watch))
                base.append(await asyncio.to_thread(direct, client))
        finally:
            await watch.close()
            await http.close()
            await stop_process(worker)
    p95 = percentile(ours, 95)
    return [
        Figure(
            "cancel_p95",
            ms(p95),
            "ms",
            "p95 ≤ 1 s",
            p95 <= 1.0,
            f"Docker SDK kill (SIGTERM) + wait + remove: p50 {ms(median(base)):.0f} ms, "
            f"p95 {ms(percentile(base, 95)):.0f} ms",
            f"REST cancel → container gone: p50 {ms(median(ours)):.0f} ms; {n} cancels",
        )
    ]
