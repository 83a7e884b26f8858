"""A scripted worker and a watching client speaking the websocket protocols (no Docker)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from tornado.websocket import WebSocketClientConnection

WsFetch = Callable[..., Awaitable[WebSocketClientConnection]]


class Peer:
    """One websocket: send envelopes, wait for the next envelope of a type."""

    def __init__(self, conn: WebSocketClientConnection) -> None:
        self.conn = conn
        self.seen: list[dict[str, Any]] = []  # every message received, in order

    async def send(self, message: dict[str, Any] | str) -> None:
        await self.conn.write_message(message if isinstance(message, str) else json.dumps(message))

    async def next(self, timeout: float = 10) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.conn.read_message(), timeout)
        if raw is None:
            raise ConnectionError("the host closed the socket")
        message: dict[str, Any] = json.loads(raw)
        self.seen.append(message)
        return message

    async def expect(self, kind: str, timeout: float = 10, **match: Any) -> dict[str, Any]:
        """The next message of this type (and these field values), skipping others."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TimeoutError(f"no {kind} {match} within {timeout}s; seen {self.seen[-5:]}")
            message = await self.next(left)
            if message["type"] == kind and all(message.get(k) == v for k, v in match.items()):
                return message

    def close(self) -> None:
        self.conn.close()


class Worker(Peer):
    """A worker that runs nothing: the test decides what each run does."""

    def __init__(self, conn: WebSocketClientConnection, worker_id: str) -> None:
        super().__init__(conn)
        self.id = worker_id

    @classmethod
    async def connect(
        cls,
        ws_fetch: WsFetch,
        worker_id: str,
        queues: tuple[str, ...] = ("q",),
        cpus: float = 1,
        held: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[Worker, dict[str, Any]]:
        """Connect, register and report all capacity free; returns (worker, registered)."""
        conn = await ws_fetch("compute-queue", "worker", headers=headers)
        worker = cls(conn, worker_id)
        await worker.send(
            {
                "type": "register",
                "protocol": 1,
                "id": worker_id,
                "version": "test",
                "capacity": {"cpus": cpus, "memory": None, "gpus": 0},
                "queues": list(queues),
                "tags": [],
                "maxDuration": 3600,
                "held": held or [],
            }
        )
        registered = await worker.expect("registered")
        await worker.send({"type": "capacity", "free": {"cpus": cpus, "memory": None, "gpus": 0}})
        return worker, registered

    async def logs(self, run_id: str, fence: int, *lines: str, stream: str = "out") -> None:
        frames = [{"s": stream, "d": line} for line in lines]
        await self.send({"type": "logs", "runId": run_id, "fence": fence, "frames": frames})

    async def result(
        self, run_id: str, fence: int, reason: str = "Success", **extra: Any
    ) -> dict[str, Any]:
        """Send a result; the host's answer (accepted or conflict)."""
        await self.send(
            {
                "type": "result",
                "runId": run_id,
                "fence": fence,
                "reason": reason,
                "exitCode": 0 if reason == "Success" else 1,
                **extra,
            }
        )
        while True:
            message = await self.next()
            if message["type"] in ("accepted", "conflict") and message.get("runId") == run_id:
                return message


async def watch(ws_fetch: WsFetch, queue: str = "q", **kw: Any) -> Peer:
    """A client watching a queue, past its first snapshot."""
    peer = Peer(await ws_fetch("compute-queue", "q", queue, "ws", **kw))
    await peer.expect("snapshot")
    return peer
