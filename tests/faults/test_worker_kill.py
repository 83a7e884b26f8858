"""Workers killed (-9) at random moments of their runs, 20 times (SPEC §5): every job still
gets exactly one accepted result, each lost attempt is counted, and nothing is left behind."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.docker_env import ImageNames
from tests.worker.conftest import Fetch, body, submit, unique_id

from .conftest import Workers, host_workers, until
from .proxy import Proxy

pytestmark = pytest.mark.slow

KILLS = 20  # in all, shared by the two workers
RUN_SECONDS = 2.0  # about how long a run lasts here, from its assignment to its result
QUEUED = 3  # runs kept waiting, so a restarted worker always finds work


@pytest.mark.parametrize("cq_config", [{"lease_seconds": 3, "max_lost": 1000}])
async def test_workers_killed_mid_run_every_job_gets_one_result(
    jp_http_port: int,
    jp_base_url: str,
    host_token: str,
    fetch: Fetch,
    workers: Workers,
    make_proxy: Callable[..., Awaitable[Proxy]],
    docker_engine: Any,
    test_images: ImageNames,
) -> None:
    rng = random.Random()
    # The workers reach the host through a tap: what the host accepted is read off the wire.
    proxy = await make_proxy(jp_http_port, tap=True)
    url = f"http://127.0.0.1:{proxy.port}{jp_base_url}"
    ids = [unique_id("kill"), unique_id("kill")]
    for worker in ids:
        workers.start(worker, url, host_token, "--cpus", "2")
    for worker in ids:
        await workers.connected(fetch, worker)

    jobs: list[str] = []
    feeding = True

    async def feed() -> None:
        while feeding:
            counts = body(await fetch("q", "q", "status"))["counts"]
            for _ in range(QUEUED - counts.get("Queued", 0)):
                command = f"echo job {len(jobs)} $JOB_RUN_ID; sleep 0.3"
                answer = await submit(
                    fetch, "q", {"image": test_images.busybox, "command": command}
                )
                jobs.append(answer["jobId"])
            await asyncio.sleep(0.05)

    async def running_on(worker: str) -> list[str]:
        return list((await host_workers(fetch)).get(worker, {}).get("running", []))

    caught: Counter[str] = Counter()  # run → kills that caught it on the host's books
    kills: list[tuple[str, int]] = []

    async def kill_repeatedly(worker: str, times: int) -> None:
        for _ in range(times):
            await until(lambda: running_on(worker), 30, f"{worker} runs something")
            await asyncio.sleep(rng.uniform(0, RUN_SECONDS))  # a random moment of the run
            await workers.kill(worker)

            async def gone() -> bool:
                return not (await host_workers(fetch))[worker]["connected"]

            await until(gone, 30, f"the host sees {worker} gone")
            held = await running_on(worker)  # these are lost: the new process knows nothing
            caught.update(held)
            kills.append((worker, len(held)))
            workers.start(worker, url, host_token, "--cpus", "2")
            await workers.connected(fetch, worker)

    feeder = asyncio.ensure_future(feed())
    started = time.monotonic()
    try:
        await asyncio.gather(*(kill_repeatedly(w, KILLS // len(ids)) for w in ids))
    finally:
        feeding = False
        await feeder
    killing = time.monotonic() - started

    async def all_finished() -> bool:
        counts = body(await fetch("q", "q", "status"))["counts"]
        return not counts.get("Queued") and not counts.get("Running")

    await until(all_finished, 90, "every job finished")

    accepted: dict[str, list[dict[str, Any]]] = {}
    for message in proxy.received("down", "accepted"):
        accepted.setdefault(message["runId"], []).append(message)
    results: dict[str, set[int]] = {}  # run → the fences its results were sent under
    for message in proxy.received("up", "result"):
        results.setdefault(message["runId"], set()).add(message["fence"])
    lost = answered = 0
    for job in jobs:
        runs = body(await fetch("j", job))["runs"]
        assert len(runs) == 1, runs  # one run per job: kills never made a second one
        run = runs[0]
        assert run["reason"] == "Success", run
        # Every attempt after the first is a counted loss: no run was silently assigned twice.
        assert run["attempt"] == run["lostCount"] + 1, run
        assert run["lostCount"] >= caught[run["runId"]], (run, caught[run["runId"]])
        lost += run["lostCount"]
        # Exactly one result accepted: the one of the last attempt, and every `accepted` the
        # host sent for this run (a resend after a reconnect is answered again) carries that
        # same record. (A worker killed just after sending its result never hears `accepted`.)
        assert run["attempt"] in results.get(run["runId"], set()), (run, results)
        answers = accepted.get(run["runId"], [])
        assert {(a["fence"], a["run"]["finishedAt"]) for a in answers} <= {
            (run["attempt"], run["finishedAt"])
        }, (run, answers)
        answered += bool(answers)
    assert len(kills) == KILLS
    assert sum(caught.values()) >= KILLS // 2, kills  # the kills did land mid-run
    assert lost >= sum(caught.values())
    assert answered >= len(jobs) // 2, (answered, len(jobs))

    # The restarted workers removed what their killed processes left running.
    def leftovers() -> list[str]:
        return [
            c.id
            for w in ids
            # Sparse: a full listing inspects each container and fails on one removed meanwhile.
            for c in docker_engine.containers.list(
                all=True, sparse=True, filters={"label": f"compute-queue.worker={w}"}
            )
        ]

    async def no_leftovers() -> bool:
        return not await asyncio.to_thread(leftovers)

    await until(no_leftovers, 30, "the workers removed their killed runs' containers")
    print(
        f"{KILLS} kills in {killing:.1f}s, {len(jobs)} jobs, runs caught by a kill: "
        f"{sum(caught.values())}, lost attempts counted: {lost}, kills that caught nothing: "
        f"{sum(1 for _, n in kills if not n)}, results heard accepted: {answered}"
    )
