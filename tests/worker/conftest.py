"""Workers against a real host and a real Docker engine.

The host is the pytest-jupyter server of tests/server; a worker runs in the test's own event
loop (`start_worker`) or as a real process (`worker_process`), with the test images built by
scripts/test-images.sh.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from jupyter_compute_queue.worker.agent import Agent, WorkerOptions
from jupyter_compute_queue.worker.docker_runner import LABEL_WORKER, DockerRunner, RunnerConfig
from jupyter_compute_queue.worker.egress import Egress
from jupyter_compute_queue.worker.resources import Resources
from jupyter_compute_queue.worker.transfer import ContentCache, Transfers
from tests.server.conftest import *  # noqa: F403 - the host fixtures (jp_*, fetch, cq_config)
from tests.server.conftest import Fetch, body

JUPYTER = str(Path(sys.executable).with_name("jupyter"))


@pytest.fixture
def host_api(jp_http_port: int, jp_base_url: str) -> str:
    """The host's compute-queue API URL, as a worker is given it."""
    return f"http://127.0.0.1:{jp_http_port}{jp_base_url}compute-queue/"


@pytest.fixture
def host_token(jp_serverapp: Any) -> str:
    return str(jp_serverapp.identity_provider.token)


StartWorker = Callable[..., Awaitable[Agent]]


@pytest.fixture
async def start_worker(
    jp_serverapp: Any,
    host_api: str,
    host_token: str,
    tmp_path: Path,
    docker_engine: Any,
    test_images: Any,
) -> AsyncIterator[StartWorker]:
    """Start in-process workers: ``await start_worker("w1", queues=("q",), cpus=2, **config)``."""
    import docker

    client = docker.from_env()
    started: list[tuple[Agent, asyncio.Task[None]]] = []

    async def start(
        worker_id: str = "w1",
        queues: tuple[str, ...] = ("q",),
        cpus: float = 2,
        memory: int | None = None,
        gpus: tuple[int, ...] = (),
        token: str | None = None,
        max_job_duration: int = 3600,
        **config: Any,
    ) -> Agent:
        data = tmp_path / f"worker-{worker_id}"
        runner = DockerRunner(
            client,
            RunnerConfig(
                data_dir=data, worker_id=worker_id, max_job_duration=max_job_duration, **config
            ),
            Transfers(host_api, token or host_token, ContentCache(data / "cache")),
            host_api,
        )
        agent = Agent(
            WorkerOptions(
                url=host_api,
                token=token or host_token,
                worker_id=worker_id,
                queues=queues,
                max_job_duration=max_job_duration,
                grace_seconds=0,
            ),
            Resources(cpus, memory, gpus),
            runner,
        )
        task = asyncio.ensure_future(agent.run_forever())
        started.append((agent, task))
        await asyncio.wait_for(agent.connected.wait(), 30)
        return agent

    yield start
    for agent, task in started:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(agent.shutdown(grace=0), 30)
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        remove_containers(client, agent.options.worker_id)


def unique_id(prefix: str = "w") -> str:
    """A worker id no other test uses: tests run in parallel on one engine, and a worker
    removes every container labelled with its id that it does not hold."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def remove_containers(client: Any, worker_id: str) -> None:
    """Remove every container and network a test worker left (only that worker's, by its
    label): each test worker has its own bridge network, and the engine has few address pools.
    The worker's egress rules go too (as root a worker adds some; a killed one leaves them)."""
    label = {"label": f"{LABEL_WORKER}={worker_id}"}
    for container in client.containers.list(all=True, sparse=True, filters=label):
        with contextlib.suppress(Exception):
            container.remove(force=True)
    for network in client.networks.list(filters=label):
        with contextlib.suppress(Exception):
            network.remove()
    Egress(worker_id).remove()


async def wait_result(
    fetch: Fetch, queue: str, job_id: str, timeout: float = 60, state: str = "Finished"
) -> dict[str, Any]:
    """Poll a job's result.json until its run reaches ``state`` (generous bound, no sleeps
    longer than a tenth of a second)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result: dict[str, Any] = body(await fetch("q", queue, "j", job_id, "result.json"))
        if result.get("state") == state:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"job {job_id} not {state} within {timeout}s: {result}")
        await asyncio.sleep(0.1)


async def submit(
    fetch: Fetch, queue: str, definition: dict[str, Any], **envelope: Any
) -> dict[str, Any]:
    """Submit one definition (or envelope) and return the answer."""
    payload = {"definition": definition, **envelope} if envelope else definition
    response = await fetch("q", queue, method="POST", json=payload)
    assert response.code == 200, response.body
    answer: dict[str, Any] = body(response)
    return answer


async def run_job(
    fetch: Fetch, definition: dict[str, Any], queue: str = "q", timeout: float = 60
) -> tuple[dict[str, Any], str]:
    """Submit, wait for the end; (result record, log text)."""
    answer = await submit(fetch, queue, definition)
    result = await wait_result(fetch, queue, answer["jobId"], timeout)
    logs = (await fetch("q", queue, "j", answer["jobId"], "logs")).body.decode()
    return result, logs


def worker_cli(*args: str, **kw: Any) -> subprocess.Popen[str]:
    """``jupyter compute-queue worker …`` as a real process (stdout/stderr piped)."""
    return subprocess.Popen(
        [JUPYTER, "compute-queue", "worker", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )
