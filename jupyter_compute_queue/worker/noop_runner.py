"""A runtime that runs nothing: every run succeeds at once, without a container.

It exists to measure the queue itself — host, store, protocol and agent — without Docker in
the way (``benchmarks/``: queue throughput, scale). A worker uses it only when started with
``--runtime noop``; it is never a way to run real jobs, which it would report as done without
running them.
"""

from __future__ import annotations

import asyncio

from ..model.runs import Phase, Reason
from .runtime import Logs, Phases, Run, RunResult

#: The phases a Docker run of an image job without outputs goes through, reported in order so
#: the host does the same work per run as for a real one.
PHASES = (Phase.PULLING, Phase.PREPARING, Phase.RUNNING, Phase.UPLOADING)


class NoopRunner:
    """A :class:`~.runtime.Runtime` that reports the phases of a run, then ``Success``."""

    def __init__(self) -> None:
        self._running: dict[str, str | None] = {}  # run id → why it is being stopped, if it is

    async def run(self, run: Run, phase: Phases, log: Logs) -> RunResult:
        self._running[run.run_id] = None
        try:
            for value in PHASES:
                phase(value, None)
            # The agent sends phases in background tasks: let them go out before the result.
            await asyncio.sleep(0)
            why = self._running[run.run_id]
            if why is not None:
                return RunResult(Reason.CANCELLED, message=why)
            return RunResult(Reason.SUCCESS, exit_code=0)
        finally:
            del self._running[run.run_id]

    async def stop(self, run_id: str, why: str = "cancelled") -> None:
        if run_id in self._running:
            self._running[run_id] = why

    async def remove_leftovers(self, keep: set[str]) -> list[str]:
        return []  # a run leaves nothing behind

    async def recovered(self) -> None:
        return None  # it never loses anything

    async def close(self) -> None:
        return None
