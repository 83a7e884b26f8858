"""Workers inside the benchmark's own process: real :class:`Agent`\\ s (the worker's protocol
code) over real websockets, with a runtime chosen by the benchmark."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from jupyter_compute_queue.worker.agent import Agent, WorkerOptions
from jupyter_compute_queue.worker.noop_runner import NoopRunner
from jupyter_compute_queue.worker.resources import Resources
from jupyter_compute_queue.worker.runtime import Logs, Phases, Run, RunResult, Runtime

from .host import TOKEN, Host


class CountingAgent(Agent):
    """An agent that also notes when the host accepted each result (the run is then finished
    and on disk: the host answers ``accepted`` after its commit)."""

    def __init__(self, *args: Any, on_accepted: Callable[[str, float], None], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._on_accepted = on_accepted

    async def _on_message(self, message: dict[str, Any]) -> None:
        if message.get("type") == "accepted":
            self._on_accepted(message["runId"], time.perf_counter())
        await super()._on_message(message)


class RecordingRunner(NoopRunner):
    """The noop runtime, noting when each run reached the worker (its assignment)."""

    def __init__(self, on_assigned: Callable[[Run, float], None]) -> None:
        super().__init__()
        self._on_assigned = on_assigned

    async def run(self, run: Run, phase: Phases, log: Logs) -> RunResult:
        self._on_assigned(run, time.perf_counter())
        return await super().run(run, phase, log)


class Agents:
    """Start agents on a host; stop them all (gracefully) at the end."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.started: list[tuple[Agent, asyncio.Task[None]]] = []

    async def start(
        self,
        worker_id: str,
        queues: tuple[str, ...],
        cpus: float,
        runner: Runtime | None = None,
        on_accepted: Callable[[str, float], None] | None = None,
    ) -> Agent:
        options = WorkerOptions(self.host.api, TOKEN, worker_id, queues, grace_seconds=0)
        resources = Resources(cpus, None, ())
        runtime = runner or NoopRunner()
        agent: Agent
        if on_accepted is not None:
            agent = CountingAgent(options, resources, runtime, on_accepted=on_accepted)
        else:
            agent = Agent(options, resources, runtime)
        task = asyncio.ensure_future(agent.run_forever())
        self.started.append((agent, task))
        await asyncio.wait_for(agent.connected.wait(), 60)
        return agent

    async def stop(self) -> None:
        for agent, task in self.started:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(agent.shutdown(grace=0), 30)
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        self.started = []

    async def __aenter__(self) -> Agents:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
