"""Worker-protocol messages that are sent in one turn of the event loop leave in one frame.

Both ends of a worker's socket send in bursts: a worker the phases of every run that started
in one turn, then their results and one capacity report; the host the answers to those
results, then the assignments of one claim. Every frame costs both ends a JSON document and a
pass through their websocket code, which at a thousand runs a second was most of the host's
time (benchmarks/RESULTS.md). So when the peer has said it takes batches (docs/protocol.md,
``batch``), a burst goes as one ``batch`` message; otherwise each message has its own frame,
as before. Either way messages leave in the order they were sent, and a sender waits until the
frame holding its message is written, as it did for a frame of its own.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from tornado.websocket import WebSocketClientConnection, WebSocketClosedError

try:
    import orjson
except ImportError:  # pragma: no cover - a dependency; json does the same, slower
    orjson = None  # type: ignore[assignment]

#: Writes one text frame, returning what to await for its flush (a websocket's write_message).
Write = Callable[[str | bytes], Awaitable[None]]
#: orjson reads integers past 64 bits as floats, where json keeps them exact: text with a run
#: of 19 digits anywhere goes to json. Found by mapping every digit to "0" and everything else
#: to a space (bytes.translate runs at memory speed; a regular expression took longer than
#: json itself on a batch).
_DIGITS = bytes(0x30 if 0x30 <= i <= 0x39 else 0x20 for i in range(256))
_LONG_RUN = b"0" * 19


def loads(text: str | bytes) -> Any:
    """``json.loads``, in a fraction of the time: orjson where it reads exactly what json reads;
    json for the rest (long integers, and what orjson refuses: NaN, lone surrogates, UTF-16 …),
    so results and error messages are json's."""
    if orjson is not None:
        try:
            data = text.encode() if isinstance(text, str) else text
        except UnicodeEncodeError:  # lone surrogates: json's to read (or refuse)
            data = None
        if data is not None and _LONG_RUN not in data.translate(_DIGITS):
            try:
                return orjson.loads(data)
            except orjson.JSONDecodeError:
                pass
    return json.loads(text)


def dumps(message: Any, ensure_ascii: bool = True) -> str | bytes:
    """A protocol message as UTF-8 JSON text, by orjson when it can (what it cannot — integers
    past 64 bits, lone surrogates, non-string keys — goes to json with ``ensure_ascii``).
    Only for messages of the worker protocol, which hold no NaN (orjson would write null)."""
    if orjson is not None:
        try:
            return orjson.dumps(message)
        except orjson.JSONEncodeError:
            pass
    return json.dumps(message, ensure_ascii=ensure_ascii)


class Outbox:
    """Messages for one connection, written once per turn of the loop."""

    def __init__(self, write: Write, dumps: Callable[[Any], str | bytes] = dumps) -> None:
        self._write = write
        self._dumps = dumps
        #: Whether the peer takes ``batch`` messages (it said so when the connection began).
        self.batches = False
        self._pending: list[dict[str, Any]] = []
        self._written: asyncio.Future[bool] | None = None
        self._writers: set[asyncio.Task[None]] = set()  # kept referenced until written

    async def send(self, message: dict[str, Any]) -> bool:
        """Queue a message; True once the frame holding it is written, False if the connection
        closed first."""
        return await self.send_all([message])

    async def send_all(self, messages: list[dict[str, Any]]) -> bool:
        """``send`` for several messages, in order, with one wait."""
        self._pending += messages
        if self._written is None:
            # The writer's first step runs in the next turn of the loop, after everything this
            # turn scheduled: whatever those send meanwhile joins the same frame.
            self._written = asyncio.get_running_loop().create_future()
            writer = asyncio.ensure_future(self._flush(self._written))
            self._writers.add(writer)
            writer.add_done_callback(self._writers.discard)
        # Shielded: a sender that is cancelled must not cancel the others' wait.
        return await asyncio.shield(self._written)

    async def _flush(self, written: asyncio.Future[bool]) -> None:
        messages, self._pending, self._written = self._pending, [], None
        if self.batches and len(messages) > 1:
            messages = [{"type": "batch", "messages": messages}]
        try:
            # Every frame goes into the stream's buffer now, in order; then wait for the flush.
            flushed = [self._write(self._dumps(m)) for m in messages]
            for future in flushed:
                await future
            ok = True
        except WebSocketClosedError:
            ok = False
        if not written.done():
            written.set_result(ok)


def abort(conn: WebSocketClientConnection) -> None:
    """Close a client connection at once: a closing handshake would wait for a peer that is
    not answering. Its reader then gets None, as after any close."""
    stream = conn.protocol.stream if conn.protocol is not None else None
    if stream is not None:
        stream.close()
    else:
        conn.close()
