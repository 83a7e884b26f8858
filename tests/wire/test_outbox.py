"""The outbox both ends of a worker socket send through: the messages of one turn of the loop
leave in one ``batch`` frame when the peer takes batches, else one frame each, in order."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tornado.websocket import WebSocketClosedError

from jupyter_compute_queue.wire.outbox import Outbox


class Frames:
    """A fake connection: the frames written, each flushed at once (or refused once closed)."""

    def __init__(self) -> None:
        self.frames: list[Any] = []
        self.closed = False

    def write(self, text: str) -> asyncio.Future[None]:
        if self.closed:
            raise WebSocketClosedError()
        self.frames.append(json.loads(text))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


async def test_one_turns_messages_leave_in_one_batch_when_the_peer_takes_them() -> None:
    conn = Frames()
    outbox = Outbox(conn.write)
    outbox.batches = True
    sent = await asyncio.gather(*(outbox.send({"type": "phase", "n": i}) for i in range(3)))
    assert sent == [True, True, True]
    assert conn.frames == [
        {"type": "batch", "messages": [{"type": "phase", "n": i} for i in range(3)]}
    ]
    assert await outbox.send({"type": "capacity"}) is True  # alone: no batch around it
    assert conn.frames[-1] == {"type": "capacity"}


async def test_without_batches_every_message_has_its_own_frame_in_order() -> None:
    conn = Frames()
    outbox = Outbox(conn.write)
    await asyncio.gather(*(outbox.send({"type": "phase", "n": i}) for i in range(3)))
    assert conn.frames == [{"type": "phase", "n": i} for i in range(3)]


async def test_a_closed_connection_says_false() -> None:
    conn = Frames()
    conn.closed = True
    assert await Outbox(conn.write).send({"type": "heartbeat"}) is False


async def test_a_cancelled_sender_does_not_cancel_the_others() -> None:
    conn = Frames()
    outbox = Outbox(conn.write)
    first = asyncio.ensure_future(outbox.send({"type": "a"}))
    second = asyncio.ensure_future(outbox.send({"type": "b"}))
    await asyncio.sleep(0)
    first.cancel()
    assert await second is True
    assert conn.frames == [{"type": "a"}, {"type": "b"}]
