"""A TCP proxy for fault tests: forwards loopback connections to a port, can cut them off, and
can read the websocket messages that cross it.

``blackhole()`` is a partition as a worker sees it: every connection stays open (nothing is
closed or reset, so neither end learns anything from its socket), every byte in either
direction is dropped, new connections are accepted and swallowed too, and a close by either end
is held back. ``resume()`` forwards again; the bytes dropped meanwhile are gone for good.

With ``tap=True`` the proxy also parses the websocket frames of each connection (the HTTP
upgrade, then RFC 6455 frames, unmasking the client's) and keeps every JSON text message in
``messages``, in the order it crossed, with the connection it used and the direction. A
direction that lost bytes in a blackhole can no longer be parsed (it would start mid-frame) and
is dropped from the tap from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Literal

Direction = Literal["up", "down"]  # up: client → target; down: target → client


@dataclass
class Message:
    """A websocket text message that crossed the proxy."""

    connection: int
    direction: Direction
    at: float  # time.monotonic() when it crossed
    data: Any


class _Frames:
    """Incremental RFC 6455 parser of one direction of one connection (after the upgrade)."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.upgraded = False
        self.fragments: list[bytes] = []
        self.broken = False

    def feed(self, data: bytes) -> list[bytes]:
        """The complete text messages in ``data`` (with what came before)."""
        if self.broken:
            return []
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return []
            del self.buffer[: end + 4]
            self.upgraded = True
        messages = []
        while (frame := self._frame()) is not None:
            fin, opcode, payload = frame
            if opcode in (0x1, 0x0):  # text, or a continuation of one
                self.fragments.append(payload)
                if fin:
                    messages.append(b"".join(self.fragments))
                    self.fragments = []
        return messages

    def _frame(self) -> tuple[bool, int, bytes] | None:
        buf = self.buffer
        if len(buf) < 2:
            return None
        fin, opcode = bool(buf[0] & 0x80), buf[0] & 0x0F
        masked, length = bool(buf[1] & 0x80), buf[1] & 0x7F
        at = 2
        if length == 126:
            if len(buf) < 4:
                return None
            (length,) = struct.unpack_from(">H", buf, 2)
            at = 4
        elif length == 127:
            if len(buf) < 10:
                return None
            (length,) = struct.unpack_from(">Q", buf, 2)
            at = 10
        mask = b""
        if masked:
            if len(buf) < at + 4:
                return None
            mask = bytes(buf[at : at + 4])
            at += 4
        if len(buf) < at + length:
            return None
        payload = bytes(buf[at : at + length])
        del buf[: at + length]
        if masked and length:
            key = (mask * (length // 4 + 1))[:length]
            unmasked = int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")
            payload = unmasked.to_bytes(length, "big")
        return fin, opcode, payload


@dataclass
class _Connection:
    number: int
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    frames: dict[Direction, _Frames] = field(
        default_factory=lambda: {"up": _Frames(), "down": _Frames()}
    )


class Proxy:
    """Forwards ``127.0.0.1:port`` to ``127.0.0.1:target_port``; see the module's docstring."""

    def __init__(self, target_port: int, tap: bool = False) -> None:
        self.target_port = target_port
        self.tap = tap
        self.port = 0
        self.messages: list[Message] = []
        self.dropped = 0  # bytes dropped by blackholes
        self._open = asyncio.Event()
        self._open.set()
        self._numbers = itertools.count(1)
        self._connections: dict[int, _Connection] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None

    @property
    def blackholed(self) -> bool:
        return not self._open.is_set()

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def blackhole(self) -> None:
        """Drop every byte from now on, both ways, on every connection; close nothing."""
        self._open.clear()

    def resume(self) -> None:
        """Forward again (what was dropped stays dropped)."""
        self._open.set()

    def received(
        self, direction: Direction, kind: str | None = None, since: float = 0.0
    ) -> list[Any]:
        """The tapped messages of one direction (of one ``type``), crossed at or after ``since``;
        the messages of a ``batch`` frame (docs/protocol.md, "Batches") one by one."""
        return [
            data
            for m in self.messages
            if m.direction == direction and m.at >= since
            for data in _unbatched(m.data)
            if kind is None or (isinstance(data, dict) and data.get("type") == kind)
        ]

    async def close(self) -> None:
        self.resume()
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections.values()):
            for writer in connection.writers:
                writer.transport.abort()
        if self._tasks:  # each ends once its sockets are gone
            await asyncio.wait(set(self._tasks), timeout=10)
        for task in list(self._tasks):
            task.cancel()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        connection = _Connection(next(self._numbers), [writer])
        self._connections[connection.number] = connection
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                writer.transport.abort()  # nothing listens there: refused, as it would be
                return
            connection.writers.append(up_writer)
            await asyncio.gather(
                self._pipe(connection, "up", reader, up_writer),
                self._pipe(connection, "down", up_reader, writer),
            )
        except asyncio.CancelledError:
            pass  # closing: asyncio's server would log a cancelled handler as an error
        finally:
            self._connections.pop(connection.number, None)
            self._tasks.discard(task)

    async def _pipe(
        self,
        connection: _Connection,
        direction: Direction,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        frames = connection.frames[direction]
        try:
            while data := await reader.read(65536):
                if self.blackholed:
                    self.dropped += len(data)
                    frames.broken = True
                    continue
                if self.tap:
                    self._record(connection, direction, frames.feed(data))
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        # A partition hides a close as well: the other end hears of it once the path is back.
        await self._open.wait()
        with contextlib.suppress(OSError):
            writer.close()

    def _record(self, connection: _Connection, direction: Direction, texts: list[bytes]) -> None:
        now = time.monotonic()
        for text in texts:
            try:
                data = json.loads(text)
            except ValueError:
                data = text.decode(errors="replace")
            self.messages.append(Message(connection.number, direction, now, data))


def _unbatched(data: Any) -> list[Any]:
    if isinstance(data, dict) and data.get("type") == "batch":
        return list(data.get("messages") or [])
    return [data]
