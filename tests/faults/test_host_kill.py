"""The host killed (-9) in the middle of a burst of 5,000 submissions and started again on the
same data dir (SPEC §10: a 200 to a submission means it is on disk; SPEC §5: exactly one result
per run is accepted). A ``--runtime noop`` worker takes the runs all along."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.worker.conftest import unique_id

from .conftest import HOST_TOKEN, HttpClient, ServedHost, Workers, until
from .proxy import Proxy

pytestmark = pytest.mark.slow

SUBMISSIONS = 5000
CLIENTS = 8  # concurrent keep-alive connections, one submission per request


async def test_host_killed_during_a_burst_loses_no_acknowledged_submission(
    tmp_path: Path, workers: Workers, make_proxy: Callable[..., Awaitable[Proxy]]
) -> None:
    host = ServedHost(tmp_path / "host")
    await host.start()
    try:
        await burst_and_kill(host, workers, make_proxy)
    finally:
        await host.stop()


async def burst_and_kill(
    host: ServedHost, workers: Workers, make_proxy: Callable[..., Awaitable[Proxy]]
) -> None:
    http = HttpClient(host.port)
    # The worker reaches the host through a tap, to read every `accepted` the host sent.
    proxy = await make_proxy(host.port, tap=True)
    worker = unique_id("noop")
    workers.start(
        worker, f"http://127.0.0.1:{proxy.port}/", HOST_TOKEN, "--runtime", "noop", "--cpus", "64"
    )

    async def status() -> dict[str, Any]:
        try:
            answer: dict[str, Any] = await http.json("GET", "compute-queue/q/q/status")
        except ConnectionError:  # its connection went with the killed host: a new one
            answer = await http.json("GET", "compute-queue/q/q/status")
        return answer

    async def connected() -> bool:
        assert workers.alive(worker), workers.log(worker)
        return any(w["id"] == worker and w["connected"] for w in (await status())["workers"])

    await until(connected, 30, "the worker connected")

    tag = uuid.uuid4().hex[:12]
    acked: dict[int, dict[str, Any]] = {}  # submission → the host's 200 answer
    unanswered: set[int] = set()  # submissions sent again: the host died before answering
    retries = 0
    kill_at = random.randint(SUBMISSIONS * 3 // 10, SUBMISSIONS * 7 // 10)
    reached = asyncio.Event()
    todo = iter(range(SUBMISSIONS))

    async def client() -> None:
        nonlocal retries
        connection = HttpClient(host.port)
        for i in todo:
            definition = {"image": "cq-test/busybox:1", "command": ["echo", f"{tag}-{i}"]}
            while True:
                try:
                    code, content = await connection.request(
                        "POST", "compute-queue/q/q", definition
                    )
                    break
                except ConnectionError:  # the host is down: ask again until it answers
                    unanswered.add(i)
                    retries += 1
                    await asyncio.sleep(0.05)
            assert code == 200, (i, code, content[:500])
            acked[i] = json.loads(content)
            if len(acked) >= kill_at:
                reached.set()
        await connection.close()

    timings: dict[str, float] = {}

    async def kill_and_restart() -> None:
        await reached.wait()
        timings["acked at kill"] = len(acked)
        killed = time.monotonic()
        await host.kill()
        await host.start()
        timings["down"] = time.monotonic() - killed

    started = time.monotonic()
    restart = asyncio.ensure_future(kill_and_restart())
    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    await restart
    timings["burst"] = time.monotonic() - started
    assert len(acked) == SUBMISSIONS

    async def all_done() -> bool:
        counts = (await status())["counts"]
        return not counts.get("Queued") and not counts.get("Running")

    await until(all_done, 120, "every run finished")
    timings["all done"] = time.monotonic() - started

    # Every run in the store after the restart, oldest to newest.
    stored: dict[str, dict[str, Any]] = {}
    cursor = None
    while True:
        page = await http.json(
            "GET", "compute-queue/q/q?limit=1000" + (f"&cursor={cursor}" if cursor else "")
        )
        stored.update({r["runId"]: r for r in page["runs"]})
        cursor = page["cursor"]
        if not cursor:
            break
    await http.close()

    # No acknowledged submission lost: each is in the store, as the run it was answered with.
    for i, answer in acked.items():
        run = stored.get(answer["runId"])
        assert run is not None, (i, answer)
        assert run["jobId"] == answer["jobId"]
    assert len(stored) == SUBMISSIONS
    assert len({r["jobId"] for r in stored.values()}) == SUBMISSIONS  # one run per job

    accepted: dict[str, list[dict[str, Any]]] = {}
    for message in proxy.received("down", "accepted"):
        accepted.setdefault(message["runId"], []).append(message)
    conflicts = proxy.received("down", "conflict")
    requeued = 0
    for run in stored.values():
        assert run["state"] == "Finished" and run["reason"] == "Success", run
        # A run assigned by the old host whose `assign` never reached the worker is requeued
        # (counted) when the worker registers again; nothing else runs a run twice.
        assert run["attempt"] == run["lostCount"] + 1, run
        requeued += run["lostCount"]
        # No result accepted twice: the worker keeps a result until it hears `accepted`, and
        # every `accepted` for the run (a resend to the new host is answered again) carries
        # the one record the store kept.
        answers = accepted.get(run["runId"])
        assert answers, run
        assert {(a["fence"], a["run"]["finishedAt"]) for a in answers} == {
            (run["attempt"], run["finishedAt"])
        }, (run, answers)
    assert not conflicts, conflicts[:5]
    assert workers.alive(worker), workers.log(worker)
    repeated = sum(len(a) - 1 for a in accepted.values())
    print(
        f"{SUBMISSIONS} submissions from {CLIENTS} clients in {timings['burst']:.1f}s; the host "
        f"killed after {timings['acked at kill']:.0f} answers and back {timings['down']:.1f}s "
        f"later; {len(unanswered)} submissions unanswered, sent again ({retries} tries); "
        f"all runs done after {timings['all done']:.1f}s; runs requeued for a lost assignment: "
        f"{requeued}; `accepted` repeated for a resent result: {repeated}"
    )
