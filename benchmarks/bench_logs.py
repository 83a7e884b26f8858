"""Logs: a container printing 200,000 lines (``seq 1 200000``). Measured: the time from the
submission until the last line reaches a subscriber of the queue websocket (subscribed from
offset 0 as soon as the submission answers), against the container's own run time with the
Docker SDK directly (create, attach, start, until the last line is read: docker_direct.py's
options). Every line number must arrive exactly once, in order; the pairs are interleaved.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from . import docker_direct
from .common import Figure, Settings, median, ms, say
from .host import Host, Http, QueueWatch, finished, stop_process, wait_workers, worker_process

QUEUE = "logs"
LINES = 200_000
LAST = f"{LINES}\n"


def direct(client: Any) -> float:
    """create → last line read, through the SDK's attach stream (as the worker reads it)."""
    start = time.perf_counter()
    container = docker_direct.create(client, ["seq", "1", str(LINES)])
    try:
        stream = client.api.attach(container.id, stream=True, logs=True)
        container.start()
        tail = b""
        for chunk in stream:
            tail = (tail + chunk)[-16:]
        end = time.perf_counter()
        container.wait()
    finally:
        container.remove(force=True)
    if not tail.endswith(LAST.encode()):
        raise RuntimeError(f"the direct run's output ended with {tail!r}")
    return end - start


async def through_host(http: Http, watch: QueueWatch) -> float:
    texts: list[str] = []
    cut = False
    last = asyncio.get_running_loop().create_future()
    run_id = ""

    def on_logs(message: dict[str, Any]) -> None:
        nonlocal cut
        if message["runId"] != run_id:
            return
        for record in message["records"]:
            if "cut" in record:
                cut = True
            elif record["s"] == "out":
                texts.append(record["d"])
                if record["d"].endswith(LAST) and not last.done():
                    last.set_result(time.perf_counter())

    watch.on_logs = on_logs
    envelope = {"definition": docker_direct.definition(["seq", "1", str(LINES)]), "rerun": True}
    start = time.perf_counter()
    answer = await http.json("POST", f"compute-queue/q/{QUEUE}", envelope)
    run_id = answer["runId"]
    await watch.send({"type": "subscribe", "runId": run_id, "since": 0})
    end: float = await asyncio.wait_for(last, 120)
    await asyncio.wait_for(watch.until(run_id, finished), 120)
    lines = "".join(texts).split("\n")
    if cut or lines != [*map(str, range(1, LINES + 1)), ""]:
        missing = LINES - len(lines) + 1
        raise RuntimeError(f"log lines lost or out of order (cut={cut}, {missing} missing)")
    return end - start


async def measure(settings: Settings) -> list[Figure]:
    n = settings.size(5, 2, 1)
    client = docker_direct.client()
    async with Host(settings.workdir / "logs-host") as host:
        http = Http(host.port)
        worker = worker_process(
            host,
            [QUEUE],
            settings.workdir / "logs-worker",
            "--network",
            "none",
            "--id",
            "bench-logs",
        )
        watch = await QueueWatch(host, QUEUE).open()
        try:
            await wait_workers(http, QUEUE, 1)
            await asyncio.to_thread(direct, client)  # warm up
            ours: list[float] = []
            base: list[float] = []
            say(f"logs: {n} interleaved pairs of {LINES:,} lines")
            for i in range(n):
                if i % 2:
                    base.append(await asyncio.to_thread(direct, client))
                    ours.append(await through_host(http, watch))
                else:
                    ours.append(await through_host(http, watch))
                    base.append(await asyncio.to_thread(direct, client))
        finally:
            await watch.close()
            await http.close()
            await stop_process(worker)
    ratio = median([o / d for o, d in zip(ours, base, strict=True)])
    return [
        Figure(
            "logs_200k_lines_ratio",
            ratio,
            "x",
            "≤ 1.5 (median of pair ratios), no line lost",
            ratio <= 1.5,
            f"Docker SDK direct, create → last line read: {ms(median(base)):.0f} ms median",
            f"submit → last line at a websocket subscriber {ms(median(ours)):.0f} ms median; "
            f"all {LINES:,} lines arrived once, in order, in each of {n} runs",
        )
    ]
