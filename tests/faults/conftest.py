"""Fault injection for SPEC §5's promise — every accepted job finishes, and exactly one result
per run is accepted — with real parts: ``jupyter compute-queue worker`` processes, a host (the
pytest-jupyter server in this process, or a ``jupyter compute-queue serve`` process that can be
killed and started again on the same data dir), a TCP proxy that can cut a worker off
(``proxy.py``), and a second Docker engine that can be restarted.

Nothing waits a fixed time for something to happen: every wait polls the host's records (or a
process, or an engine) with a generous bound, and fails saying what did not happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.host import Http, stop_process
from tests.docker_env import ImageNames, docker_client, free_loopback_port, in_ci, missing
from tests.worker.conftest import *  # noqa: F403 - the host fixtures (jp_*, fetch, cq_config …)
from tests.worker.conftest import JUPYTER, Fetch, body, remove_containers

from .proxy import Proxy

# --- polling ------------------------------------------------------------------------------


async def until(check: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    """Poll ``check`` every 50 ms until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)


async def run_record(fetch: Fetch, job_id: str, queue: str = "q") -> dict[str, Any]:
    """The job's latest run in the queue, as the host records it."""
    record: dict[str, Any] = body(await fetch("q", queue, "j", job_id, "result.json"))
    return record


async def host_workers(fetch: Fetch, queue: str = "q") -> dict[str, dict[str, Any]]:
    """The host's view of a queue's workers, by id."""
    return {w["id"]: w for w in body(await fetch("q", queue, "status"))["workers"]}


# --- worker processes ---------------------------------------------------------------------


def worker_env(**values: str) -> dict[str, str]:
    """This environment without COMPUTE_QUEUE_* settings, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPUTE_QUEUE_")}
    return {**env, "PYTHONUNBUFFERED": "1", **values}


class Workers:
    """``jupyter compute-queue worker`` processes of one test, by worker id: each (re)start
    logs to its own file; at the end every process is killed and every container and network
    of these ids is removed (a killed worker leaves its ``compute-queue-*`` network)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, list[Path]] = {}
        self.engines: dict[str, dict[str, str]] = {}  # worker id → its environment

    def start(
        self, worker_id: str, url: str, token: str, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start (or start again, on the same data dir, hence the same id) a worker."""
        current = self.processes.get(worker_id)
        assert current is None or current.poll() is not None, f"{worker_id} still runs"
        logs = self.logs.setdefault(worker_id, [])
        path = self.tmp_path / f"{worker_id}-{len(logs)}.log"
        logs.append(path)
        env = env or worker_env()
        self.engines[worker_id] = env
        with path.open("wb") as log:
            process = subprocess.Popen(
                [JUPYTER, "compute-queue", "worker", "q", "--url", url, "--token", token,
                 "--id", worker_id, "--data-dir", str(self.tmp_path / worker_id), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )  # fmt: skip
        self.processes[worker_id] = process
        return process

    async def kill(self, worker_id: str) -> None:
        """kill -9, and wait until the process is gone."""
        process = self.processes[worker_id]
        process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(process.wait, 30)

    def alive(self, worker_id: str) -> bool:
        return self.processes[worker_id].poll() is None

    def log(self, worker_id: str) -> str:
        """Everything every start of this worker printed."""
        return "\n".join(p.read_text(errors="replace") for p in self.logs.get(worker_id, []))

    async def connected(self, fetch: Fetch, worker_id: str, timeout: float = 30) -> None:
        """Wait until the host lists the worker as connected (failing at once, with its output,
        if its process ended)."""

        async def check() -> bool:
            assert self.alive(worker_id), self.log(worker_id)
            worker = (await host_workers(fetch)).get(worker_id)
            return bool(worker and worker["connected"])

        await until(check, timeout, f"worker {worker_id} connected")

    def cleanup(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        for worker_id, env in self.engines.items():
            if "DOCKER_HOST" in env:
                continue  # another engine's, torn down with it
            remove_worker_leftovers(worker_id)


def remove_worker_leftovers(worker_id: str) -> None:
    """A test worker's containers and its network, on the main engine."""
    client = docker_client()
    try:
        remove_containers(client, worker_id)
        label = {"label": f"compute-queue.worker={worker_id}"}
        for network in client.networks.list(filters=label):
            for _ in range(50):  # the engine may still release a removed container's endpoint
                try:
                    network.remove()
                    break
                except Exception:
                    time.sleep(0.1)
    finally:
        client.close()


@pytest.fixture
def workers(tmp_path: Path, docker_engine: Any) -> Iterator[Workers]:
    procs = Workers(tmp_path)
    try:
        yield procs
    finally:
        procs.cleanup()


@pytest.fixture
async def make_proxy() -> AsyncIterator[Callable[..., Awaitable[Proxy]]]:
    """Start proxies: ``await make_proxy(target_port, tap=True)``; all closed at the end."""
    proxies: list[Proxy] = []

    async def make(target_port: int, tap: bool = False) -> Proxy:
        proxy = await Proxy(target_port, tap=tap).start()
        proxies.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in proxies:
            await proxy.close()


# --- a host process -----------------------------------------------------------------------

HOST_TOKEN = "faults-token"


class ServedHost:
    """``jupyter compute-queue serve`` on one loopback port and one data dir, both kept when
    the process is killed and started again."""

    def __init__(self, data_dir: Path, *config: str) -> None:
        self.data_dir = data_dir
        self.config = config
        self.port = free_loopback_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def log(self) -> str:
        return "\n".join(
            p.read_text(errors="replace")
            for p in sorted(self.data_dir.parent.glob(f"{self.data_dir.name}-*.log"))
        )

    async def start(self, timeout: float = 60) -> None:
        """Start it and wait until it answers its health check."""
        self.process = process = self._spawn()

        async def answers() -> bool:
            assert process.poll() is None, f"the host ended at start:\n{self.log()}"
            client = HttpClient(self.port)
            try:
                status, _ = await client.request("GET", "compute-queue/healthz")
                return status == 200
            except OSError:
                return False
            finally:
                await client.close()

        await until(answers, timeout, "the host answers")

    def _spawn(self) -> subprocess.Popen[bytes]:
        log_path = self.data_dir.parent / f"{self.data_dir.name}-{self.starts}.log"
        self.starts += 1
        with log_path.open("wb") as log:
            return subprocess.Popen(
                [JUPYTER, "compute-queue", "serve", "--ip", "127.0.0.1", "--port", str(self.port),
                 "--token", HOST_TOKEN, "--data-dir", str(self.data_dir),
                 "--ServerApp.port_retries=0", "--ServerApp.log_level=WARN",
                 "--ComputeQueueApp.local_worker=False",
                 *(["--allow-root"] if os.getuid() == 0 else []), *self.config],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    async def kill(self) -> None:
        """kill -9, and wait until the process is gone."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(self.process.wait, 30)

    async def stop(self) -> None:
        if self.process is not None:
            await stop_process(self.process)


class HttpClient(Http):
    """The benchmarks' keep-alive HTTP/1.1 client (JSON in, bytes out). A connection the host
    dropped raises ``ConnectionResetError``; the next request connects again."""

    def __init__(self, port: int, token: str = HOST_TOKEN) -> None:
        super().__init__(port, token)

    async def request(
        self, method: str, path: str, body: Any = None, raw: bytes | None = None
    ) -> tuple[int, bytes]:
        try:
            return await super().request(method, path, body, raw)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            await self.close()
            raise ConnectionResetError(f"{method} {path}: {exc!r}") from None

    async def json(self, method: str, path: str, body: Any = None) -> Any:
        status, content = await self.request(method, path, body)
        assert status == 200, (method, path, status, content[:500])
        return json.loads(content)

    async def close(self) -> None:
        # Abort, not close: the host may be dead (killed by the test) and never answer a FIN.
        if self._writer is not None:
            self._writer.transport.abort()
        self._reader = self._writer = None


# --- a second Docker engine ---------------------------------------------------------------


class Engine:
    """A dockerd of its own: its socket, data root, exec root, pid file, no bridge and no
    iptables rules, so the machine's main engine (and every other test) is untouched."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.socket = folder / "docker.sock"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def client(self) -> Any:
        import docker

        return docker.DockerClient(base_url=self.url, version=None, timeout=60)

    def answers(self) -> bool:
        try:
            client = self.client()  # asks the engine its API version
        except Exception:
            return False
        try:
            return bool(client.ping())
        except Exception:
            return False
        finally:
            client.close()

    async def start(self, timeout: float = 60) -> None:
        """Start it and wait until it answers."""
        self.process = process = self._spawn()

        async def up() -> bool:
            assert process.poll() is None, self.log()
            return await asyncio.to_thread(self.answers)

        await until(up, timeout, "the second dockerd answers")

    def _spawn(self) -> subprocess.Popen[bytes]:
        log = (self.folder / f"dockerd-{self.starts}.log").open("wb")
        self.starts += 1
        with log:
            return subprocess.Popen(
                # In a network namespace of its own: an engine started with --bridge=none in
                # the machine's namespace deletes docker0, the main engine's default bridge
                # (seen here: every `docker build` with a RUN step failed afterwards).
                ["unshare", "--net", dockerd(), "--host", self.url,
                 "--data-root", str(self.folder / "data"),
                 "--exec-root", str(self.folder / "exec"),
                 "--pidfile", str(self.folder / "docker.pid"), "--bridge=none",
                 "--iptables=false", "--ip-forward=false", "--ip-masq=false",
                 "--log-level=warn"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    async def terminate(self, timeout: float = 60) -> None:
        """SIGTERM (the engine stops its containers), and wait until it is gone."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(self.process.wait, timeout)

    def log(self) -> str:
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(self.folder.glob("dockerd-*.log"))
        )

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def dockerd() -> str:
    """The engine's binary (root's PATH has /usr/sbin; another's may not)."""
    return shutil.which("dockerd", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin") or ""


@pytest.fixture
async def second_engine(test_images: ImageNames, docker_engine: Any) -> AsyncIterator[Engine]:
    """A second dockerd holding the busybox test image; stopped and removed at the end.

    Needs root (dockerd does); outside CI a non-root run skips, saying so."""
    if os.getuid() != 0:
        if in_ci():
            pytest.fail("CI=true runs as root: the second Docker engine must start")
        pytest.skip("a second Docker engine (dockerd) needs root: run as root to test it")
    if not dockerd():
        missing("dockerd is not installed", "run: bash scripts/docker.sh as root")
    # Short: the engine's unix sockets (and containerd's under the exec root) must stay under
    # the 108 bytes a socket path may have.
    folder = Path(tempfile.mkdtemp(prefix="cq-dd-", dir="/tmp"))
    engine = Engine(folder)
    try:
        await engine.start()
        image = docker_engine.images.get(test_images.busybox)
        data = b"".join(
            await asyncio.to_thread(lambda: list(image.save(named=test_images.busybox)))
        )
        client = engine.client()
        try:
            await asyncio.to_thread(client.images.load, data)
        finally:
            client.close()
        yield engine
    finally:
        await asyncio.to_thread(engine.kill)
        shutil.rmtree(folder, ignore_errors=True)
