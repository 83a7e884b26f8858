"""Callbacks of submissions in SQLite (SPEC §11): queued with the submission, made due when
their run finishes, in the same transactions, so a callback is never lost between the two.

The functions taking a connection run inside the writer's transactions; :class:`CallbackQueries`
is the store's async side, mixed into :class:`~.sqlite.SqliteStore`.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection
from typing import Any

from ...model.runs import RunRecord
from .base import DueCallback, SubmitRequest
from .engine import Engine


def payload(record: RunRecord, namespace: str) -> str:
    """The body of a callback: ``{jobId, runId, queue, namespace, state, reason}``."""
    return json.dumps(
        {
            "jobId": record.job_id,
            "runId": record.run_id,
            "queue": record.queue,
            "namespace": namespace,
            "state": record.state.value,
            "reason": record.reason.value if record.reason else None,
        }
    )


def add_for_submission(
    c: sqlite3.Connection, req: SubmitRequest, record: RunRecord, outcome: str, now: float
) -> None:
    """Keep a submission's callbacks: ``queued`` is due now when a run was queued or joined;
    ``finished`` is due now on a cache hit (or a finished run), else when its run finishes."""
    if not req.callbacks:
        return
    (seq,) = c.execute("SELECT seq FROM runs WHERE run_id = ?", (record.run_id,)).fetchone()
    rows: list[tuple[Any, ...]] = []
    for event, url in sorted(req.callbacks.items()):
        if event == "queued" and outcome == "cached":
            continue  # nothing was queued or joined
        due = event == "queued" or record.finished
        body = payload(record, req.namespace) if due else None
        rows.append((seq, event, url, req.namespace, body, now if due else None, now))
    c.executemany(
        "INSERT INTO callbacks (seq, event, url, namespace, payload, due_at, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        rows,
    )


def run_finished(c: sqlite3.Connection, seq: int, record: RunRecord, now: float) -> None:
    """The run ``seq`` finished: its waiting ``finished`` callbacks are due now."""
    for callback_id, namespace in c.execute(
        "SELECT id, namespace FROM callbacks WHERE seq = ? AND due_at IS NULL", (seq,)
    ).fetchall():
        c.execute(
            "UPDATE callbacks SET payload = ?, due_at = ? WHERE id = ?",
            (payload(record, namespace), now, callback_id),
        )


class CallbackQueries:
    """The store's callback methods (see :class:`~.base.Store`)."""

    _engine: Engine

    async def due_callbacks(self, now: float, limit: int) -> list[DueCallback]:
        def read(c: sqlite3.Connection) -> list[DueCallback]:
            return [
                DueCallback(row[0], row[1], row[2], json.loads(row[3]), row[4])
                for row in c.execute(
                    "SELECT id, event, url, payload, attempts FROM callbacks"
                    " WHERE due_at IS NOT NULL AND due_at <= ? ORDER BY due_at, id LIMIT ?",
                    (now, limit),
                )
            ]

        return await self._engine.read(read)

    async def next_callback_at(self) -> float | None:
        def read(c: sqlite3.Connection) -> float | None:
            row = c.execute("SELECT min(due_at) FROM callbacks WHERE due_at IS NOT NULL").fetchone()
            return None if row is None or row[0] is None else float(row[0])

        return await self._engine.read(read)

    async def callbacks_waiting(self) -> bool:
        def read(c: sqlite3.Connection) -> bool:
            return (
                c.execute("SELECT 1 FROM callbacks WHERE due_at IS NULL LIMIT 1").fetchone()
                is not None
            )

        return await self._engine.read(read)

    async def callbacks_done(self, ids: Collection[int]) -> None:
        wanted = [(i,) for i in ids]
        await self._engine.write(
            lambda c: c.executemany("DELETE FROM callbacks WHERE id = ?", wanted)
        )

    async def callback_retry(self, callback_id: int, due_at: float) -> None:
        await self._engine.write(
            lambda c: c.execute(
                "UPDATE callbacks SET attempts = attempts + 1, due_at = ? WHERE id = ?",
                (due_at, callback_id),
            )
        )
