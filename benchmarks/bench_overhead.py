"""End-to-end overhead: submit → finished of ``true`` on the busybox test image through the host
and a real worker process (``--network none``), against the Docker SDK running the same
container directly (create + start + wait + remove, the worker's options: docker_direct.py).

The two are interleaved, alternating which goes first, so drift of the machine hits both; the
figure is the median of the per-pair ratios. "Finished" is when the queue websocket (open
before the submission, as a watching front end is) delivers the run's Finished record.
"""

from __future__ import annotations

import asyncio
import time

from . import docker_direct
from .common import Figure, Settings, median, ms, say
from .host import Host, Http, QueueWatch, finished, stop_process, wait_workers, worker_process

QUEUE = "overhead"


async def through_host(http: Http, watch: QueueWatch) -> float:
    envelope = {"definition": docker_direct.definition(["true"]), "rerun": True}
    start = time.perf_counter()
    answer = await http.json("POST", f"compute-queue/q/{QUEUE}", envelope)
    end = await asyncio.wait_for(watch.until(answer["runId"], finished), 120)
    record = watch.runs[answer["runId"]]
    if record["reason"] != "Success":
        raise RuntimeError(f"the benchmark's run did not succeed: {record}")
    return end - start


async def measure(settings: Settings) -> list[Figure]:
    n = settings.size(30, 4, 1)
    client = docker_direct.client()
    async with Host(settings.workdir / "overhead-host") as host:
        http = Http(host.port)
        worker = worker_process(
            host,
            [QUEUE],
            settings.workdir / "overhead-worker",
            "--network",
            "none",
            "--id",
            "bench-overhead",
        )
        watch = await QueueWatch(host, QUEUE).open()
        try:
            await wait_workers(http, QUEUE, 1)
            for _ in range(1 if settings.quick else 2):  # warm up both paths
                await through_host(http, watch)
                await asyncio.to_thread(docker_direct.run_true, client)
            ours: list[float] = []
            direct: list[float] = []
            say(f"overhead: {n} interleaved pairs")
            for i in range(n):
                if i % 2:
                    direct.append(await asyncio.to_thread(docker_direct.run_true, client))
                    ours.append(await through_host(http, watch))
                else:
                    ours.append(await through_host(http, watch))
                    direct.append(await asyncio.to_thread(docker_direct.run_true, client))
        finally:
            await watch.close()
            await http.close()
            await stop_process(worker)
    ratio = median([o / d for o, d in zip(ours, direct, strict=True)])
    return [
        Figure(
            "e2e_overhead_ratio",
            ratio,
            "x",
            "≤ 1.15 (median of pair ratios)",
            ratio <= 1.15,
            f"Docker SDK direct {ms(median(direct)):.0f} ms median",
            f"through host + worker {ms(median(ours)):.0f} ms median; {n} pairs",
        )
    ]
