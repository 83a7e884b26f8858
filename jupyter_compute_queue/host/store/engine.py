"""SQLite from asyncio: one writer thread with group commit, one reader thread.

Every write is a plain synchronous function of a connection. The writer thread takes every
write queued while it was busy and runs them in one transaction, each inside its own savepoint
so one failing write does not undo the others; their callers are answered only after the
COMMIT, so an answer always describes state that is on disk.

The writer thread drives itself: it starts the next group as soon as a commit returns, without
waiting for the event loop to hand it work (under load the loop is busy, and that wait was half
of each group's time: benchmarks/RESULTS.md). It answers a whole group with one call into the
loop.

This is what aiosqlite would give us, minus one thread hop per statement: a whole transaction
runs in the writer thread in one hop, which is what makes group commit cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

#: Schema migrations, applied in order; ``PRAGMA user_version`` counts the ones applied.
#: Never edit a released entry: append a new one.
Migration = str

_Write = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]"]


class Engine:
    """Owns the connections and the writer's queue."""

    def __init__(self, path: Path, migrations: Sequence[Migration]) -> None:
        self._path = path
        self._migrations = migrations
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="cq-sqlite-read")
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._queue: deque[_Write | None] = deque()  # None: the writer stops
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        await loop.run_in_executor(self._reader, self._open_writer)
        await loop.run_in_executor(self._reader, self._open_reader)
        self._stopped = loop.create_future()
        self._thread = threading.Thread(
            target=self._write_loop, name="cq-sqlite-write", daemon=True
        )
        self._thread.start()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("PRAGMA cache_size = -32768")  # 32 MiB of pages per connection
        conn.execute("PRAGMA temp_store = MEMORY")
        return conn

    def _open_writer(self) -> None:
        conn = self._connect()
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL: a commit is on disk when it returns, so a 200 means the submission is kept.
        conn.execute("PRAGMA synchronous = FULL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(self._migrations):
            conn.close()
            raise RuntimeError(
                f"{self._path} has schema version {version}, newer than this release knows "
                f"({len(self._migrations)}): upgrade jupyter-compute-queue"
            )
        for number, script in enumerate(self._migrations[version:], start=version + 1):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _statements(script):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        self._wconn = conn

    def _open_reader(self) -> None:
        self._rconn = self._connect()
        self._rconn.execute("PRAGMA query_only = ON")

    async def close(self) -> None:
        """Commit what is queued, then close both connections."""
        if self._thread is not None and self._stopped is not None:
            with self._wake:
                self._queue.append(None)
                self._wake.notify()
            await asyncio.shield(self._stopped)
            self._thread = None
        loop = asyncio.get_running_loop()
        if self._wconn is not None:
            await loop.run_in_executor(self._reader, self._wconn.close)
        if self._rconn is not None:
            await loop.run_in_executor(self._reader, self._rconn.close)
        self._wconn = self._rconn = None
        self._reader.shutdown(wait=True)

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on the read connection (it sees committed state only)."""
        conn = self._rconn
        if conn is None:
            raise RuntimeError("the store is not open")
        return await asyncio.get_running_loop().run_in_executor(self._reader, fn, conn)

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in the next group transaction; returns its result after the commit."""
        return await self.write_later(fn)

    def write_later(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue ``fn`` for the next group transaction now, in call order with every other
        write; the future resolves after its commit. For writes nobody waits on."""
        if self._thread is None or self._loop is None:
            raise RuntimeError("the store is not open")
        future: asyncio.Future[T] = self._loop.create_future()
        with self._wake:
            self._queue.append((fn, future))
            self._wake.notify()
        return future

    def _write_loop(self) -> None:
        """The writer thread: one group transaction per turn, until close() says stop."""
        loop = self._loop
        assert loop is not None
        stopping = False
        while not stopping:
            with self._wake:
                while not self._queue:
                    self._wake.wait()
                batch: list[_Write] = []
                while self._queue:
                    item = self._queue.popleft()
                    if item is None:
                        stopping = True
                        break
                    batch.append(item)
            if batch:
                try:
                    results = self._run_group([fn for fn, _ in batch])
                except BaseException as exc:  # the COMMIT itself failed: nobody's write holds
                    results = [(False, exc)] * len(batch)
                try:
                    loop.call_soon_threadsafe(_answer, batch, results)
                except RuntimeError:  # the loop closed without closing the store
                    return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_done, self._stopped)

    def _run_group(self, fns: list[Callable[[sqlite3.Connection], Any]]) -> list[tuple[bool, Any]]:
        conn = self._wconn
        assert conn is not None
        results: list[tuple[bool, Any]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for fn in fns:
                conn.execute("SAVEPOINT op")
                try:
                    value = fn(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((False, exc))
                else:
                    conn.execute("RELEASE op")
                    results.append((True, value))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results


def _answer(batch: list[_Write], results: list[tuple[bool, Any]]) -> None:
    for (_, future), (ok, value) in zip(batch, results, strict=True):
        if future.done():  # its caller gave up waiting
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


def _done(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


def _statements(script: str) -> list[str]:
    """Split a migration script into statements (it holds no triggers or string semicolons)."""
    return [part.strip() for part in script.split(";") if part.strip()]
