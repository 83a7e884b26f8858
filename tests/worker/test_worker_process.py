"""The worker as a real process against a real host and Docker engine: start checks, its lasting
id, many runs on two workers, and the faults of SPEC §5 (kill -9, a partition, SIGTERM, a
dropped socket)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from jupyter_compute_queue.host.access import worker_credential
from jupyter_compute_queue.host.datadir import host_secret

from .conftest import (
    JUPYTER,
    Fetch,
    StartWorker,
    body,
    remove_containers,
    submit,
    wait_result,
    worker_cli,
)

pytestmark = pytest.mark.usefixtures("test_images")


# --- helpers ------------------------------------------------------------------------------


async def finish(process: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str]:
    """Wait (off the loop, which serves the host) for a process to end: (exit code, stderr)."""
    _, err = await asyncio.to_thread(process.communicate, timeout=timeout)
    return process.returncode, err


async def until(check: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    """Poll ``check`` until it returns something true; its value."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.1)


async def workers(fetch: Fetch, queue: str = "q") -> dict[str, dict[str, Any]]:
    """The host's view of a queue's workers, by id."""
    status = body(await fetch("q", queue, "status"))
    return {w["id"]: w for w in status["workers"]}


async def connected(fetch: Fetch, worker_id: str, processes: Processes | None = None) -> None:
    """Wait until the host lists the worker as connected (failing early, with its output, if its
    process ended)."""

    async def check() -> bool:
        if processes is not None:
            process = processes.by_id[worker_id]
            assert process.poll() is None, processes.log(process)
        worker = (await workers(fetch)).get(worker_id)
        return bool(worker and worker["connected"])

    await until(check, 30, f"worker {worker_id} connected")


async def run_record(fetch: Fetch, job_id: str, queue: str = "q") -> dict[str, Any]:
    record: dict[str, Any] = body(await fetch("q", queue, "j", job_id, "result.json"))
    return record


async def running_on(fetch: Fetch, job_id: str, worker_id: str) -> dict[str, Any]:
    """Wait until the job's run is in phase ``running`` on ``worker_id``."""

    async def check() -> dict[str, Any] | None:
        record = await run_record(fetch, job_id)
        worker = record.get("worker") or {}
        if record["state"] == "Running" and record.get("phase") == "running":
            assert worker.get("id") == worker_id, record
            return record
        assert record["state"] != "Finished", record
        return None

    result: dict[str, Any] = await until(check, 30, f"job {job_id} running on {worker_id}")
    return result


def run_containers(client: Any, run_id: str) -> list[Any]:
    # Sparse: a full listing inspects each container and fails on one removed meanwhile.
    label = {"label": f"compute-queue.run={run_id}"}
    return list(client.containers.list(all=True, sparse=True, filters=label))


def worker_of(container: Any) -> str:
    return str(container.attrs["Labels"]["compute-queue.worker"])


def remove_worker_leftovers(client: Any, worker_id: str) -> None:
    """A test worker's containers and its network (each new worker id makes one)."""
    remove_containers(client, worker_id)
    for network in client.networks.list(filters={"label": f"compute-queue.worker={worker_id}"}):
        for _ in range(20):  # the engine may still be releasing a removed container's endpoint
            try:
                network.remove()
                break
            except Exception:
                time.sleep(0.1)


class Processes:
    """Worker processes of one test: started with their log in a file, killed at the end."""

    def __init__(self, tmp_path: Path, client: Any) -> None:
        self.tmp_path = tmp_path
        self.client = client
        self.started: list[subprocess.Popen[str]] = []
        self.ids: set[str] = set()
        self.logs: dict[int, Path] = {}  # pid → its output
        self.by_id: dict[str, subprocess.Popen[str]] = {}

    def start(
        self, worker_id: str | None, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[str]:
        name = worker_id or f"anon{len(self.started)}"
        path = self.tmp_path / f"{name}-{len(self.started)}.log"
        log = path.open("w")
        extra = ["--id", worker_id] if worker_id else []
        process = subprocess.Popen(
            [JUPYTER, "compute-queue", "worker", *args, *extra],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        log.close()
        self.started.append(process)
        self.logs[process.pid] = path
        if worker_id:
            self.ids.add(worker_id)
            self.by_id[worker_id] = process
        return process

    def log(self, process: subprocess.Popen[str]) -> str:
        return self.logs[process.pid].read_text()

    def cleanup(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        for worker_id in self.ids:
            remove_worker_leftovers(self.client, worker_id)


@pytest.fixture
def processes(tmp_path: Path, docker_engine: Any) -> Iterator[Processes]:
    procs = Processes(tmp_path, docker_engine)
    try:
        yield procs
    finally:
        procs.cleanup()


def env_with(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPUTE_QUEUE_")}
    env.update(values)
    return env


# --- start checks -------------------------------------------------------------------------


async def test_start_errors_say_what_to_fix(
    host_api: str,
    host_token: str,
    tmp_path: Path,
    processes: Processes,
    fetch: Fetch,
    jp_serverapp: Any,
) -> None:
    url = host_api.removesuffix("compute-queue/")
    app = jp_serverapp.web_app.settings["compute_queue"]
    other_queue = worker_credential(host_secret(app._owned.path), "other")
    clean = env_with()
    data = tmp_path / "data"
    # One worker holds a data dir; every other start must fail, saying what to fix.
    holder = processes.start(
        "holder", "q", "--url", url, "--token", host_token, "--data-dir", str(data)
    )

    def start(
        name: str, *args: str, env: dict[str, str] = clean, folder: Path | None = None
    ) -> None:
        folder = folder or tmp_path / name
        worker_id = f"start-{name}"  # a worker that gets as far as Docker makes its network
        cases[name] = worker_cli("q", *args, "--data-dir", str(folder), "--id", worker_id, env=env)
        processes.started.append(cases[name])  # killed at the end if still running
        processes.ids.add(worker_id)  # and its network removed

    cases: dict[str, subprocess.Popen[str]] = {}
    start("unreachable", "--url", "http://127.0.0.1:1/")
    start("no-docker", "--url", url, env={**clean, "DOCKER_HOST": "unix:///nonexistent.sock"})
    start("bad-token", "--url", url, "--token", "wrong")
    start("no-url")
    start("queue-refused", "--url", url, "--token", other_queue)
    await connected(fetch, "holder", processes)
    start("in-use", "--url", url, "--token", host_token, folder=data)
    ends = {name: await finish(process) for name, process in cases.items()}
    code, err = ends["unreachable"]
    assert code == 2 and "cannot reach the host at http://127.0.0.1:1/" in err, err
    code, err = ends["no-docker"]
    assert code == 2 and "Docker engine" in err and "systemctl start docker" in err, err
    code, err = ends["bad-token"]
    assert code == 3 and "refused this worker (401)" in err and "worker credential" in err, err
    code, err = ends["in-use"]
    assert code == 2 and "--data-dir" in err and str(data) in err, err
    code, err = ends["no-url"]
    assert code == 2 and "--url" in err and "COMPUTE_QUEUE_URL" in err, err
    code, err = ends["queue-refused"]
    assert code == 3 and "may not work on queue 'q'" in err, err
    assert holder.poll() is None, processes.log(holder)


async def test_url_and_token_from_the_environment(
    host_api: str, host_token: str, tmp_path: Path, processes: Processes, fetch: Fetch
) -> None:
    env = env_with(
        COMPUTE_QUEUE_URL=host_api.removesuffix("compute-queue/"), COMPUTE_QUEUE_TOKEN=host_token
    )
    data = tmp_path / "w"
    data.mkdir(mode=0o755)
    data.chmod(0o755)  # as a user's umask leaves it
    process = processes.start("from-env", "q", "--data-dir", str(data), env=env)
    await connected(fetch, "from-env", processes)
    assert process.poll() is None
    # It holds other people's inputs and outputs: the worker closes it to other users.
    assert data.stat().st_mode & 0o777 == 0o700


async def test_a_restarted_worker_keeps_its_id(
    host_api: str, host_token: str, tmp_path: Path, processes: Processes, fetch: Fetch
) -> None:
    url = host_api.removesuffix("compute-queue/")
    args = ("q", "--url", url, "--token", host_token, "--data-dir", str(tmp_path / "w"))
    ids = []
    for _ in range(2):
        process = processes.start(None, *args)

        async def one_connected() -> list[str]:
            return [i for i, w in (await workers(fetch)).items() if w["connected"]]

        found = await until(one_connected, 30, "a worker connected")
        assert len(found) == 1, found
        processes.ids.update(found)
        ids.append(found[0])
        process.send_signal(signal.SIGTERM)
        code, _ = await finish(process)
        assert code == 0, processes.log(process)
        assert not await one_connected()
    assert ids[0] == ids[1]
    assert (tmp_path / "w" / "worker-id").read_text().strip() == ids[0]


async def test_two_workers_fifty_runs(
    host_api: str,
    host_token: str,
    tmp_path: Path,
    processes: Processes,
    fetch: Fetch,
    test_images: Any,
) -> None:
    url = host_api.removesuffix("compute-queue/")
    for name in ("p1", "p2"):
        processes.start(
            name, "q", "--url", url, "--token", host_token, "--cpus", "2",
            "--data-dir", str(tmp_path / name),
        )  # fmt: skip
    await connected(fetch, "p1", processes)
    await connected(fetch, "p2", processes)
    image = test_images.busybox
    jobs = [
        (
            await submit(
                fetch,
                "q",
                {
                    "image": image,
                    "command": f"echo job {i} run $JOB_RUN_ID",
                    "requirements": {"cpus": 0.25},
                },
            )
        )["jobId"]
        for i in range(50)
    ]
    results = [await wait_result(fetch, "q", job, timeout=60) for job in jobs]
    used = set()
    for i, (job, result) in enumerate(zip(jobs, results, strict=True)):
        assert result["reason"] == "Success" and result["attempt"] == 1, result
        runs = body(await fetch("j", job))["runs"]
        assert [r["runId"] for r in runs] == [result["runId"]], runs
        logs = (await fetch("q", "q", "j", job, "logs")).body.decode()
        assert f"job {i} run {result['runId']}" in logs, logs
        used.add(result["worker"]["id"])
    assert used == {"p1", "p2"}


# --- faults -------------------------------------------------------------------------------


class Proxy:
    """A TCP proxy to the host: ``pause()`` stops forwarding both ways while every connection
    stays open (a partition); ``drop()`` closes the connections (new ones are accepted)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.open = asyncio.Event()
        self.open.set()
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[Any]] = set()
        self.port = 0
        self.server: asyncio.Server | None = None
        self.accepted = 0  # connections taken, so a test can see a client come back

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.writers += [writer, up_writer]
        pipes = [
            asyncio.ensure_future(self._pipe(reader, up_writer)),
            asyncio.ensure_future(self._pipe(up_reader, writer)),
        ]
        self.tasks.update(pipes)
        await asyncio.gather(*pipes, return_exceptions=True)
        self.tasks.difference_update(pipes)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self.open.wait()
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def pause(self) -> None:
        self.open.clear()

    def resume(self) -> None:
        self.open.set()

    def drop(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    async def close(self) -> None:
        self.resume()
        self.drop()
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.fixture
async def proxy(jp_http_port: int) -> AsyncIterator[Proxy]:
    proxy = Proxy(jp_http_port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


LEASE_2S = pytest.mark.parametrize("cq_config", [{"lease_seconds": 2}])


@LEASE_2S
async def test_kill_9_mid_run_another_worker_finishes(
    host_api: str,
    host_token: str,
    tmp_path: Path,
    processes: Processes,
    fetch: Fetch,
    start_worker: StartWorker,
    test_images: Any,
    docker_engine: Any,
) -> None:
    url = host_api.removesuffix("compute-queue/")
    a = processes.start("kill-a", "q", "--url", url, "--token", host_token, "--cpus", "2")
    await connected(fetch, "kill-a", processes)
    job = (
        await submit(fetch, "q", {"image": test_images.busybox, "command": "sleep 4; echo done"})
    )["jobId"]
    first = await running_on(fetch, job, "kill-a")
    a.send_signal(signal.SIGKILL)
    await finish(a)
    processes.ids.add("kill-b")  # its network goes too
    await start_worker("kill-b")
    result = await wait_result(fetch, "q", job, timeout=30)
    assert result["reason"] == "Success", result
    assert result["worker"]["id"] == "kill-b"
    assert result["lostCount"] == 1 and result["attempt"] == 2
    assert result["runId"] == first["runId"]
    assert "done" in (await fetch("q", "q", "j", job, "logs")).body.decode()

    # B removes its own container after reporting the result (reporting comes first).
    async def b_cleaned_up() -> bool:
        workers = [worker_of(c) for c in run_containers(docker_engine, first["runId"])]
        return "kill-b" not in workers

    await until(b_cleaned_up, 30, "kill-b removing its finished container")
    # B never touched A's orphan container (the test's cleanup removes it).
    orphans = run_containers(docker_engine, first["runId"])
    assert [worker_of(c) for c in orphans] == ["kill-a"]


@LEASE_2S
async def test_a_partitioned_worker_stops_its_own_container(
    jp_base_url: str,
    host_token: str,
    tmp_path: Path,
    processes: Processes,
    fetch: Fetch,
    proxy: Proxy,
    test_images: Any,
    docker_engine: Any,
) -> None:
    url = f"http://127.0.0.1:{proxy.port}{jp_base_url}"
    processes.start("part-a", "q", "--url", url, "--token", host_token, "--cpus", "2")
    await connected(fetch, "part-a", processes)
    job = (await submit(fetch, "q", {"image": test_images.busybox, "command": "sleep 60"}))["jobId"]
    run_id = (await running_on(fetch, job, "part-a"))["runId"]
    assert run_containers(docker_engine, run_id)
    proxy.pause()
    started = asyncio.get_running_loop().time()

    async def container_gone() -> bool:
        return not await asyncio.to_thread(run_containers, docker_engine, run_id)

    await until(container_gone, 2 + 6, "the partitioned worker stopped its container")
    took = asyncio.get_running_loop().time() - started
    assert took > 1.5, f"stopped after {took:.1f}s, before the lease could pass"

    async def requeued() -> dict[str, Any] | None:
        record = await run_record(fetch, job)
        return record if record["state"] != "Running" or record["attempt"] > 1 else None

    record = await until(requeued, 10, "the host requeued the run")
    assert record["state"] == "Queued" and record["lostCount"] == 1, record


async def test_sigterm_gives_runs_back(
    host_api: str,
    host_token: str,
    processes: Processes,
    fetch: Fetch,
    test_images: Any,
    docker_engine: Any,
) -> None:
    url = host_api.removesuffix("compute-queue/")
    a = processes.start(
        "term-a", "q", "--url", url, "--token", host_token, "--cpus", "4", "--grace", "1s"
    )
    await connected(fetch, "term-a", processes)
    # Four long runs at once: each holds Docker calls for its whole life, and stopping them
    # must still get through.
    jobs = [
        (await submit(fetch, "q", {"image": test_images.busybox, "command": f"sleep 6{i}"}))[
            "jobId"
        ]
        for i in range(4)
    ]
    for job in jobs:
        await running_on(fetch, job, "term-a")
    started = asyncio.get_running_loop().time()
    a.send_signal(signal.SIGTERM)
    code, _ = await finish(a, timeout=20)
    took = asyncio.get_running_loop().time() - started
    assert code == 0, processes.log(a)
    assert took < 6, f"took {took:.1f}s to stop"
    for job in jobs:
        record = await run_record(fetch, job)
        assert record["state"] == "Queued" and record["lostCount"] == 0, record
    label = {"label": "compute-queue.worker=term-a"}
    left = docker_engine.containers.list(all=True, sparse=True, filters=label)
    assert left == [], [(c.name, c.status, c.attrs["Created"], c.labels) for c in left]
    # Its network too: the engine's address pools are few, a network per worker would run out.
    assert [n.name for n in docker_engine.networks.list(filters=label)] == []


async def test_a_dropped_socket_keeps_the_run(
    jp_base_url: str,
    host_token: str,
    processes: Processes,
    fetch: Fetch,
    proxy: Proxy,
    test_images: Any,
) -> None:
    url = f"http://127.0.0.1:{proxy.port}{jp_base_url}"
    processes.start("drop-a", "q", "--url", url, "--token", host_token, "--cpus", "2")
    await connected(fetch, "drop-a", processes)
    job = (
        await submit(fetch, "q", {"image": test_images.busybox, "command": "sleep 3; echo done"})
    )["jobId"]
    await running_on(fetch, job, "drop-a")
    before = proxy.accepted
    proxy.drop()

    # The worker comes back on a new connection. (Polling the host for the worker being
    # disconnected raced the reconnect: on a loaded machine the gap can be shorter than a poll.)
    async def back() -> bool:
        return proxy.accepted > before

    await until(back, 30, "the worker connected again after the drop")
    await connected(fetch, "drop-a", processes)
    result = await wait_result(fetch, "q", job, timeout=30)
    assert result["reason"] == "Success", result
    assert result["attempt"] == 1 and result["lostCount"] == 0, result
    assert result["worker"]["id"] == "drop-a"
    assert "done" in (await fetch("q", "q", "j", job, "logs")).body.decode()
