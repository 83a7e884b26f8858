"""The worker's ``noop`` runtime (for benchmarks of the queue): runs finish at once, without
Docker; the Docker runtime stays the default."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from pathlib import Path

from jupyter_compute_queue.model.jobs import parse_definition
from jupyter_compute_queue.model.runs import Reason
from jupyter_compute_queue.worker.agent import Agent, WorkerOptions
from jupyter_compute_queue.worker.cli_args import add_arguments
from jupyter_compute_queue.worker.noop_runner import PHASES, NoopRunner
from jupyter_compute_queue.worker.resources import Allocation, Resources
from jupyter_compute_queue.worker.runtime import Run

from .conftest import Fetch, body, submit, unique_id, wait_result, worker_cli


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_docker_is_the_default_runtime() -> None:
    assert parse("q").runtime == "docker"
    assert parse("q", "--runtime", "noop").runtime == "noop"


async def test_a_noop_worker_completes_runs(fetch: Fetch, host_api: str, host_token: str) -> None:
    worker_id = unique_id("noop")
    agent = Agent(
        WorkerOptions(host_api, host_token, worker_id, ("q",), grace_seconds=0),
        Resources(2, None, ()),
        NoopRunner(),
    )
    task = asyncio.ensure_future(agent.run_forever())
    try:
        await asyncio.wait_for(agent.connected.wait(), 30)
        answers = [
            await submit(fetch, "q", {"image": "nothing:runs", "command": ["job", str(i)]})
            for i in range(5)
        ]
        for answer in answers:
            record = await wait_result(fetch, "q", answer["jobId"], timeout=30)
            assert record["reason"] == "Success" and record["exitCode"] == 0, record
            assert record["worker"]["id"] == worker_id
        # Finished Success runs are cached results like any other.
        again = await submit(fetch, "q", {"image": "nothing:runs", "command": ["job", "0"]})
        assert again["cached"] is True
    finally:
        await asyncio.wait_for(agent.shutdown(grace=0), 30)
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


async def test_noop_runner_reports_phases_then_success() -> None:
    phases = []
    run = Run(
        "r1", "j1", "q", 1, parse_definition({"image": "x"}), {}, "", Allocation("r1", 1, 0, ())
    )
    result = await NoopRunner().run(run, lambda p, d: phases.append(p), lambda s, t: None)
    assert result.reason is Reason.SUCCESS and result.exit_code == 0
    assert tuple(phases) == PHASES


async def test_the_worker_command_takes_runtime_noop(
    fetch: Fetch, host_api: str, host_token: str, tmp_path: Path
) -> None:
    """Through the real command line: no Docker engine is asked for."""
    worker_id = unique_id("noop")
    url = host_api.removesuffix("compute-queue/")
    process = worker_cli(
        "q",
        "--runtime",
        "noop",
        "--url",
        url,
        "--token",
        host_token,
        "--id",
        worker_id,
        "--data-dir",
        str(tmp_path / "w"),
        "--cpus",
        "4",
    )
    try:
        answer = await submit(fetch, "q", {"image": "nothing:runs", "command": ["cli"]})
        record = await wait_result(fetch, "q", answer["jobId"], timeout=60)
        assert record["reason"] == "Success", record
        assert record["worker"]["id"] == worker_id
        status = body(await fetch("q", "q", "status"))
        assert [w["id"] for w in status["workers"]] == [worker_id]
    finally:
        process.terminate()
        _, err = await asyncio.to_thread(process.communicate, timeout=30)
    assert process.returncode == 0, err
    assert "for benchmarks only" in err


async def test_noop_runner_obeys_a_stop() -> None:
    runner = NoopRunner()
    run = Run(
        "r2", "j2", "q", 1, parse_definition({"image": "x"}), {}, "", Allocation("r2", 1, 0, ())
    )
    task = asyncio.ensure_future(runner.run(run, lambda p, d: None, lambda s, t: None))
    await asyncio.sleep(0)  # the run is under way
    await runner.stop("r2", "cancelled by a test")
    result = await task
    assert result.reason is Reason.CANCELLED and result.message == "cancelled by a test"
    await runner.stop("r2")  # a stop for a run it no longer has changes nothing
    assert await runner.remove_leftovers(set()) == []
