"""A job that takes the runtime (the Docker engine) down with it every time ends ``WorkerLost``
at the host's ``max_lost`` instead of going round forever: the worker gives a run its runtime
lost back *counted* (docs/protocol.md, ``give-back``). No Docker: a runtime that loses every
run, against the real host."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from jupyter_compute_queue.worker import agent as agent_module
from jupyter_compute_queue.worker.agent import Agent, WorkerOptions
from jupyter_compute_queue.worker.resources import Resources
from jupyter_compute_queue.worker.runtime import Logs, Phases, Run, RunResult, RuntimeLost

from .conftest import Fetch, submit, unique_id, wait_result


class LosingRuntime:
    """Every run takes the engine down; the engine is back at once."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, int]] = []

    async def run(self, run: Run, phase: Phases, log: Logs) -> RunResult:
        self.runs.append((run.run_id, run.fence))
        log("out", "crashing the engine\n")
        raise RuntimeLost("the Docker engine stopped answering (test)")

    async def stop(self, run_id: str, why: str = "cancelled") -> None:
        pass

    async def remove_leftovers(self, keep: set[str]) -> list[str]:
        return []

    async def recovered(self) -> None:
        pass

    async def close(self) -> None:
        pass


async def test_a_run_that_loses_the_engine_every_time_ends_worker_lost(
    fetch: Fetch, host_api: str, host_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent_module, "RECOVER_BACKOFF", 0.01)
    runtime = LosingRuntime()
    worker_id = unique_id("lose")
    agent = Agent(
        WorkerOptions(host_api, host_token, worker_id, ("q",), grace_seconds=0),
        Resources(1, None, ()),
        runtime,
    )
    task = asyncio.ensure_future(agent.run_forever())
    try:
        await asyncio.wait_for(agent.connected.wait(), 30)
        answer = await submit(fetch, "q", {"image": "engine:killer", "command": "crash"})
        result = await wait_result(fetch, "q", answer["jobId"], timeout=20)
        assert result["reason"] == "WorkerLost", result
        assert result["lostCount"] == 3 and result["attempt"] == 3, result
        assert runtime.runs == [(answer["runId"], fence) for fence in (1, 2, 3)]
        logs = (await fetch("q", "q", "j", answer["jobId"], "logs")).body.decode()
        assert logs.count("crashing the engine") == 3, logs
        # The worker is still there and takes other work.
        assert agent.connected.is_set()
    finally:
        await asyncio.wait_for(agent.shutdown(grace=0), 30)
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
