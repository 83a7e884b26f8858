"""A callback receiver for the tests: a real HTTP server on loopback that records every POST
and answers with the statuses it is told to (then 200)."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Call:
    path: str
    headers: dict[str, str]
    body: Any
    status: int  # what the receiver answered


class Receiver:
    """Records calls; ``fail`` maps a path to how many first calls to it get a 500."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.fail: dict[str, int] = {}
        self.url = ""
        self._lock = threading.Lock()

    def answer(self, path: str) -> int:
        with self._lock:
            left = self.fail.get(path, 0)
            if left:
                self.fail[path] = left - 1
                return 500
            return 200

    def record(self, call: Call) -> None:
        with self._lock:
            self.calls.append(call)

    def to(self, path: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.path == path]

    def delivered(self, path: str) -> list[Any]:
        """The bodies the receiver took (answered 200) at ``path``."""
        return [c.body for c in self.to(path) if c.status == 200]

    async def wait(
        self, check: Callable[[], bool], timeout: float = 15, what: str = "a callback"
    ) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout}s; got {self.calls}")
            await asyncio.sleep(0.02)


@contextmanager
def receiving() -> Iterator[Receiver]:
    receiver = Receiver()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            status = receiver.answer(self.path)
            receiver.record(Call(self.path, dict(self.headers.items()), json.loads(raw), status))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
