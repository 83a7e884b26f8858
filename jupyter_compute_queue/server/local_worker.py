"""The host's own worker on queue ``local``: a supervised subprocess.

It runs as a separate process so that a crash, a hung Docker call or a SIGKILL of the worker
never takes the Jupyter server down; when it exits, it is started again with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

log = logging.getLogger(__name__)

#: On stop, how long the worker gets after SIGTERM before SIGKILL, and (below it) how long its
#: runs get to finish before it gives them back. The worker's own default grace (30 s) is
#: longer than this wait: a running job would be killed with the worker, not given back.
STOP_SECONDS = 10.0
RUN_GRACE = "5s"


def docker_reachable(timeout: float = 3.0) -> bool:
    """Whether a Docker engine answers (``local_worker = "auto"`` starts a worker only then)."""
    try:
        import docker

        docker.from_env(timeout=int(timeout)).ping()
        return True
    except Exception:  # no SDK, no socket, no permission: all mean "no local worker"
        return False


class LocalWorker:
    """Start, watch and restart ``jupyter compute-queue worker local``."""

    def __init__(self, url: str, token: str | None, data_dir: Path, extra: list[str]) -> None:
        self.url = url
        self.token = token
        self.data_dir = data_dir
        self.extra = extra
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._supervise())

    async def _supervise(self) -> None:
        delay = 1.0
        while not self._stopping:
            env = {**os.environ, "COMPUTE_QUEUE_URL": self.url}
            if self.token:
                env["COMPUTE_QUEUE_TOKEN"] = self.token
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "jupyter_compute_queue.cli",
                "worker",
                "local",
                "--data-dir",
                str(self.data_dir),
                "--grace",
                RUN_GRACE,
                *self.extra,  # may give another --grace: the last one counts
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
            )
            self.starts += 1
            log.info("compute-queue: local worker started (pid %s)", self.process.pid)
            code = await self.process.wait()
            if self._stopping:
                return
            log.warning(
                "compute-queue: the local worker exited (%s); restarting in %.0fs", code, delay
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)

    async def stop(self, grace: float = STOP_SECONDS) -> None:
        """SIGTERM (the worker gives its runs back), then SIGKILL after ``grace``."""
        self._stopping = True
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), grace)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
