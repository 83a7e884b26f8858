"""A Redis server for the RQ and Celery baselines: Debian's ``redis-server``, started by the
benchmark on a loopback port (no systemd), and stopped at the end."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path

from .host import free_port

APT_COMMAND = (
    "DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server"
)


class RedisUnavailable(RuntimeError):
    """No redis-server, and it cannot be installed here; the message says how to get it."""


def ensure_installed() -> str:
    """The path of ``redis-server``, installing Debian's package as root when it is missing."""
    found = shutil.which("redis-server")
    if found:
        return found
    if os.getuid() != 0 or not shutil.which("apt-get"):
        raise RedisUnavailable(f"redis-server is missing; install it with:  sudo {APT_COMMAND}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "NEEDRESTART_MODE": "a"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "redis-server"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        subprocess.run(install, env=env, capture_output=True, check=False)
    found = shutil.which("redis-server")
    if not found:
        raise RedisUnavailable(f"installing redis-server failed; try:  {APT_COMMAND}")
    return found


class RedisServer:
    """``redis-server`` on 127.0.0.1, in the foreground of a child process, without
    persistence (no RDB snapshot, no AOF: Redis's in-memory form, as RQ and Celery use it by
    default; our host fsyncs every commit, which RESULTS.md points out)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def _spawn(self, binary: str) -> subprocess.Popen[bytes]:
        with open(self.folder / "redis.log", "wb") as log:
            return subprocess.Popen(
                [
                    binary,
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.folder),
                    "--daemonize",
                    "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    async def start(self) -> RedisServer:
        binary = ensure_installed()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process = self._spawn(binary)
        import redis

        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                client.close()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RedisUnavailable(
                        f"redis-server did not answer; see {self.folder / 'redis.log'}"
                    ) from None
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            await asyncio.to_thread(self.process.wait, 10)

    async def __aenter__(self) -> RedisServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
