"""Scale: submission and assignment latency on a host whose store holds 1,000,000 runs, against
a host with an empty store, both running at once and measured in turns (so drift hits both);
and the host's memory (RSS) with 1,000,000 runs stored, against the empty host's.

The full store is filled by ``fill.py`` (bulk SQLite inserts through the store's own schema).
Each host has one idle worker on the measured queue (an in-process agent, ``noop`` runtime,
room for 4 runs so it is never full): the submission latency is POST → answer over a
keep-alive connection; the assignment latency is POST sent → the run reaching the worker.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from . import fill
from .agents import Agents, RecordingRunner
from .common import Figure, Settings, median, ms, say
from .host import Host, Http

QUEUE = "scale"


class Side:
    """One host with its worker and its client connection."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.http = Http(host.port)
        self.assigned: dict[str, float] = {}
        self.accepted: dict[str, asyncio.Future[None]] = {}
        self.submit: list[float] = []
        self.assign: list[float] = []

    def on_assigned(self, run: Any, at: float) -> None:
        self.assigned[run.run_id] = at

    def on_accepted(self, run_id: str, at: float) -> None:
        future = self.accepted.setdefault(run_id, asyncio.get_running_loop().create_future())
        if not future.done():
            future.set_result(None)

    async def once(self, i: int) -> None:
        body = {"image": "bench/scale", "command": ["scale", str(i)]}
        start = time.perf_counter()
        answer = await self.http.json("POST", f"compute-queue/q/{QUEUE}", body)
        answered = time.perf_counter()
        run_id = answer["runId"]
        future = self.accepted.setdefault(run_id, asyncio.get_running_loop().create_future())
        await asyncio.wait_for(future, 60)
        self.submit.append(answered - start)
        self.assign.append(self.assigned[run_id] - start)


async def measure(settings: Settings) -> list[Figure]:
    runs = settings.size(1_000_000, 100_000, 2_000)
    n = settings.size(500, 100, 4)
    full_dir = settings.workdir / "scale-full"
    state = full_dir / "state.sqlite"
    full_dir.mkdir(parents=True, exist_ok=True)
    await fill.create_schema(state)
    say(f"scale: filling a store with {runs:,} runs")
    seconds = await asyncio.to_thread(fill.fill, state, runs, QUEUE)
    say(f"scale: filled in {seconds:.0f} s")
    async with Host(full_dir) as full, Host(settings.workdir / "scale-empty") as empty:
        sides = [Side(empty), Side(full)]
        async with Agents(full) as full_agents, Agents(empty) as empty_agents:
            for side, agents in ((sides[0], empty_agents), (sides[1], full_agents)):
                await agents.start(
                    f"scale-{id(side)}",
                    (QUEUE,),
                    4,
                    runner=RecordingRunner(side.on_assigned),
                    on_accepted=side.on_accepted,
                )
            for side in sides:  # warm up
                for i in range(10):
                    await side.once(-1 - i)
                side.submit.clear()
                side.assign.clear()
            say(f"scale: {n} submissions to each host, in turns")
            for i in range(n):
                for side in sides if i % 2 else reversed(sides):
                    await side.once(i)
            rss_full, rss_empty = full.rss(), empty.rss()
        for side in sides:
            await side.http.close()
    e, f = sides
    submit_ratio = median(f.submit) / median(e.submit)
    assign_ratio = median(f.assign) / median(e.assign)
    size = f"{runs:,} runs stored" + (" (--quick: not 1,000,000)" if settings.quick else "")
    mb = 1024**2
    return [
        Figure(
            "scale_submit_ratio",
            submit_ratio,
            "x",
            "≤ 1.5",
            submit_ratio <= 1.5,
            f"empty store: submit p50 {ms(median(e.submit)):.2f} ms",
            f"{size}: submit p50 {ms(median(f.submit)):.2f} ms; {n} submissions each",
        ),
        Figure(
            "scale_assign_ratio",
            assign_ratio,
            "x",
            "≤ 1.5",
            assign_ratio <= 1.5,
            f"empty store: submit → assigned p50 {ms(median(e.assign)):.2f} ms",
            f"{size}: submit → assigned p50 {ms(median(f.assign)):.2f} ms",
        ),
        Figure(
            "scale_host_rss",
            rss_full / mb,
            "MB",
            "≤ 300 MB",
            rss_full <= 300 * mb,
            f"the empty host's RSS {rss_empty / mb:.0f} MB",
            f"{size}, after {n + 10} submissions",
        ),
    ]
