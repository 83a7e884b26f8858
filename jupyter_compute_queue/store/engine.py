"""SQLite from asyncio: one writer thread with group commit, one reader thread.

Every write is a plain synchronous function of a connection. Writes queued during one turn of
the event loop (and while the previous group is committing) run in one transaction, each inside
its own savepoint so one failing write does not undo the others; their callers are answered
only after the COMMIT, so an answer always describes state that is on disk.

This is what aiosqlite would give us, minus one thread hop per statement: a whole transaction
runs in the writer thread in one hop, which is what makes group commit cheap.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

#: Schema migrations, applied in order; ``PRAGMA user_version`` counts the ones applied.
#: Never edit a released entry: append a new one.
Migration = str


class Engine:
    """Owns the connections and the writer's queue."""

    def __init__(self, path: Path, migrations: Sequence[Migration]) -> None:
        self._path = path
        self._migrations = migrations
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="cq-sqlite-write")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="cq-sqlite-read")
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._pending: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, self._open_writer)
        await loop.run_in_executor(self._reader, self._open_reader)

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
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        loop = asyncio.get_running_loop()
        if self._wconn is not None:
            await loop.run_in_executor(self._writer, self._wconn.close)
        if self._rconn is not None:
            await loop.run_in_executor(self._reader, self._rconn.close)
        self._wconn = self._rconn = None
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on the read connection (it sees committed state only)."""
        conn = self._rconn
        if conn is None:
            raise RuntimeError("the store is not open")
        return await asyncio.get_running_loop().run_in_executor(self._reader, fn, conn)

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in the next group transaction; returns its result after the commit."""
        if self._wconn is None:
            raise RuntimeError("the store is not open")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((fn, future))
        if self._flusher is None:
            # The task's first step runs on the next loop turn: everything queued in this
            # turn goes into the same transaction.
            self._flusher = asyncio.ensure_future(self._flush())
        return await future

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                fns = [fn for fn, _ in batch]
                try:
                    results = await loop.run_in_executor(self._writer, self._run_group, fns)
                except BaseException as exc:  # the COMMIT itself failed: nobody's write holds
                    results = [(False, exc)] * len(batch)
                for (_, future), (ok, value) in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
        finally:
            self._flusher = None

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


def _statements(script: str) -> list[str]:
    """Split a migration script into statements (it holds no triggers or string semicolons)."""
    return [part.strip() for part in script.split(";") if part.strip()]
