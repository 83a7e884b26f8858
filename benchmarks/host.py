"""A real queue host (``jupyter compute-queue serve`` as a subprocess), a keep-alive HTTP client,
the queue websocket, and worker processes.

The client side is deliberately thin (raw HTTP/1.1 on asyncio streams) so that what is measured
is the host, not a client library.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

TOKEN = "benchmark-token"


def jupyter() -> str:
    """The ``jupyter`` command of this interpreter's environment."""
    beside = Path(sys.executable).with_name("jupyter")
    return str(beside) if beside.exists() else (shutil.which("jupyter") or "jupyter")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Host:
    """``jupyter compute-queue serve`` on a loopback port, with its own data dir."""

    def __init__(self, data_dir: Path, extra: Sequence[str] = ()) -> None:
        self.data_dir = data_dir
        self.extra = list(extra)
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def api(self) -> str:
        return self.url + "compute-queue/"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    def _spawn(self) -> subprocess.Popen[bytes]:
        with open(self.log_path, "wb") as log:
            return subprocess.Popen(
                [
                    jupyter(),
                    "compute-queue",
                    "serve",
                    "--ip",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--token",
                    TOKEN,
                    "--data-dir",
                    str(self.data_dir),
                    "--ComputeQueueApp.local_worker=False",
                    "--ServerApp.log_level=WARN",
                    "--ServerApp.port_retries=0",
                    *(["--allow-root"] if os.getuid() == 0 else []),
                    *self.extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    async def start(self, timeout: float = 60) -> Host:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process = self._spawn()
        log_name = self.log_path
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the host ended at start; see {log_name}")
            with contextlib.suppress(OSError):
                http = Http(self.port)
                status, _ = await http.request("GET", "compute-queue/healthz")
                await http.close()
                if status == 200:
                    return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"the host did not answer within {timeout}s; see {log_name}")
            await asyncio.sleep(0.1)

    def rss(self) -> int:
        return rss_bytes(self.pid)

    async def stop(self) -> None:
        if self.process is not None:
            await stop_process(self.process)

    async def __aenter__(self) -> Host:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class Http:
    """One keep-alive HTTP/1.1 connection to the host (Content-Length and chunked answers)."""

    def __init__(self, port: int, token: str = TOKEN) -> None:
        self.port = port
        self.token = token
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, body: Any = None, raw: bytes | None = None
    ) -> tuple[int, bytes]:
        """``(status, body)``; ``body`` is sent as JSON, ``raw`` as is."""
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self._reader is not None
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        head = (
            f"{method} /{path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Authorization: token {self.token}\r\nContent-Length: {len(data)}\r\n"
            + ("Content-Type: application/json\r\n" if body is not None else "")
            + "\r\n"
        )
        self._writer.write(head.encode() + data)
        status_line = await self._reader.readline()
        if not status_line:
            raise ConnectionError("the host closed the connection")
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while (line := await self._reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while size := int((await self._reader.readline()).split(b";")[0], 16):
                parts.append(await self._reader.readexactly(size))
                await self._reader.readline()
            await self._reader.readline()
            content = b"".join(parts)
        else:
            content = await self._reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, content

    async def json(self, method: str, path: str, body: Any = None) -> Any:
        status, content = await self.request(method, path, body)
        if status >= 300:
            raise RuntimeError(f"{method} {path}: {status} {content[:300]!r}")
        return json.loads(content)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        self._reader = self._writer = None


class QueueWatch:
    """The queue websocket: the newest state of every run, and log subscriptions."""

    def __init__(self, host: Host, queue: str) -> None:
        self.host = host
        self.queue = queue
        self.runs: dict[str, dict[str, Any]] = {}
        self._waiters: dict[
            str, list[tuple[Callable[[dict[str, Any]], bool], asyncio.Future[float]]]
        ] = {}
        self.on_logs: Callable[[dict[str, Any]], None] | None = None
        self._conn: WebSocketClientConnection | None = None
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> QueueWatch:
        url = self.host.api.replace("http", "ws", 1) + f"q/{self.queue}/ws"
        request = HTTPRequest(url, headers={"Authorization": f"token {TOKEN}"})
        self._conn = await websocket_connect(request, max_message_size=64 * 1024 * 1024)
        self._task = asyncio.ensure_future(self._read())
        return self

    async def _read(self) -> None:
        assert self._conn is not None
        while (raw := await self._conn.read_message()) is not None:
            now = time.perf_counter()
            message = json.loads(raw)
            kind = message.get("type")
            if kind == "run":
                record = message["run"]
                self.runs[record["runId"]] = record
                waiters = self._waiters.get(record["runId"], [])
                for check, future in list(waiters):
                    if check(record) and not future.done():
                        future.set_result(now)
                        waiters.remove((check, future))
            elif kind == "logs" and self.on_logs is not None:
                self.on_logs(message)

    def until(self, run_id: str, check: Callable[[dict[str, Any]], bool]) -> asyncio.Future[float]:
        """A future set to the time (perf_counter) a record of the run first passes ``check``."""
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        record = self.runs.get(run_id)
        if record is not None and check(record):
            future.set_result(time.perf_counter())
        else:
            self._waiters.setdefault(run_id, []).append((check, future))
        return future

    async def send(self, message: dict[str, Any]) -> None:
        assert self._conn is not None
        await self._conn.write_message(json.dumps(message))

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


def finished(record: dict[str, Any]) -> bool:
    return record.get("state") == "Finished"


def worker_process(
    host: Host, queues: Sequence[str], data_dir: Path, *args: str
) -> subprocess.Popen[bytes]:
    """``jupyter compute-queue worker`` as a real process; its output goes to a log file."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log = open(data_dir.parent / f"{data_dir.name}.log", "wb")  # noqa: SIM115
    with log:
        return subprocess.Popen(
            [
                jupyter(),
                "compute-queue",
                "worker",
                *queues,
                "--url",
                host.url,
                "--token",
                TOKEN,
                "--data-dir",
                str(data_dir),
                *args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


async def stop_process(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL after ``timeout``."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        await asyncio.to_thread(process.wait, timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        await asyncio.to_thread(process.wait)


async def wait_workers(http: Http, queue: str, count: int, timeout: float = 60) -> None:
    """Until the host lists ``count`` connected workers on the queue."""
    deadline = time.monotonic() + timeout
    while True:
        status = await http.json("GET", f"compute-queue/q/{queue}/status")
        if sum(1 for w in status["workers"] if w["connected"]) >= count:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count} workers did not connect to {queue} within {timeout}s")
        await asyncio.sleep(0.1)
