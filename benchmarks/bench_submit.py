"""Submission latency for one client over real HTTP (one keep-alive connection) to a
``jupyter compute-queue serve`` process whose store runs with ``synchronous=FULL`` (its
default): single submissions, batches of 100, and cache hits. The baseline is ``GET healthz``
on the same connection, interleaved with the submissions.

Single submissions and batches are measured twice: with no worker connected (the submission
alone: one group commit), and with an idle worker connected (``--runtime noop``, in this
process), which is the usual state of a host: the answer then also waits for the run's
assignment. Cache hits are submissions of jobs whose run finished ``Success`` (the idle worker
is connected).
"""

from __future__ import annotations

import time
from typing import Any

from .agents import Agents
from .common import Figure, Settings, median, ms, percentile, say
from .host import Host, Http

QUEUE = "submit"


def job(tag: str, i: int) -> dict[str, Any]:
    return {"image": "bench/noop", "command": ["submit", tag, str(i)]}


async def _timed(http: Http, method: str, path: str, body: Any = None) -> float:
    start = time.perf_counter()
    status, content = await http.request(method, path, body)
    elapsed = time.perf_counter() - start
    if status != 200:
        raise RuntimeError(f"{method} {path}: {status} {content[:300]!r}")
    return elapsed


async def _series(
    http: Http, n: int, body: Any, health: list[float], path: str = f"compute-queue/q/{QUEUE}"
) -> list[float]:
    """``n`` POSTs of ``body(i)``, each followed by a ``GET healthz``."""
    times = []
    for i in range(n):
        times.append(await _timed(http, "POST", path, body(i)))
        health.append(await _timed(http, "GET", "compute-queue/healthz"))
    return times


def _p(values: list[float]) -> str:
    return f"p50 {ms(median(values)):.2f} ms, p99 {ms(percentile(values, 99)):.2f} ms"


async def measure(settings: Settings) -> list[Figure]:
    n = settings.size(1000, 100, 5)
    batches = settings.size(100, 10, 2)
    health: list[float] = []
    async with Host(settings.workdir / "submit-host") as host:
        http = Http(host.port)
        for i in range(20):  # warm up the connection, the handlers and the store
            await _timed(http, "POST", f"compute-queue/q/{QUEUE}", job("warm", i))
        say(f"submit: {n} single submissions, {batches} batches of 100 (no worker)")
        single = await _series(http, n, lambda i: job("a", i), health)
        batch = await _series(
            http, batches, lambda b: [job(f"b{b}", i) for i in range(100)], health
        )
        async with Agents(host) as agents:
            await agents.start("submit-worker", (QUEUE,), 4)
            say(f"submit: the same with an idle worker connected, then {n} cache hits")
            # The queue's earlier runs are done first, so the worker is idle again.
            await _drain(http)
            single_w = await _series(http, n, lambda i: job("c", i), health)
            await _drain(http)
            # Fewer: each batch's 100 runs go through the one worker before the cache hits.
            batch_w = await _series(
                http, max(1, batches // 5), lambda b: [job(f"d{b}", i) for i in range(100)], health
            )
            await _drain(http)
            hits = await _series(http, n, lambda i: job("c", i), health)
            again = await http.json("POST", f"compute-queue/q/{QUEUE}", job("c", 0))
            if again["cached"] is not True:
                raise RuntimeError(f"a resubmitted job was not a cache hit: {again}")
        await http.close()
    base = f"GET healthz {_p(health)}"
    return [
        Figure(
            "submit_p50",
            ms(median(single)),
            "ms",
            "p50 ≤ 3 ms",
            ms(median(single)) <= 3,
            base,
            f"{_p(single)}, one client, no worker connected, {n} submissions; with an idle "
            f"worker connected (the answer waits for the assignment): {_p(single_w)}",
        ),
        Figure(
            "submit_batch100_p50",
            ms(median(batch)),
            "ms",
            "",
            None,
            base,
            f"{_p(batch)} per request of 100 runs, no worker connected, {batches} batches; "
            f"with an idle worker connected: {_p(batch_w)} ({len(batch_w)} batches)",
        ),
        Figure(
            "cache_hit_p50",
            ms(median(hits)),
            "ms",
            "p50 ≤ 10 ms",
            ms(median(hits)) <= 10,
            base,
            f"{_p(hits)}, {n} submissions of finished jobs, an idle worker connected",
        ),
    ]


async def _drain(http: Http, timeout: float = 300) -> None:
    """Wait until the queue has nothing queued or running."""
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        counts = (await http.json("GET", f"compute-queue/q/{QUEUE}/status"))["counts"]
        if counts["Queued"] == 0 and counts["Running"] == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"queue {QUEUE} did not drain: {counts}")
        await asyncio.sleep(0.05)
