"""Rows of the ``runs`` table to records, and the state changes several transactions share."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from ...model.runs import (
    ROW_FIELDS,
    OutputRef,
    Phase,
    Reason,
    RunRecord,
    RunState,
    WorkerRef,
    trusted,
    utc,
)
from .callbacks import run_finished

STATES: list[RunState] = [RunState.QUEUED, RunState.RUNNING, RunState.FINISHED]
STATE_CODE = {state: code for code, state in enumerate(STATES)}

RUN_COLUMNS = (
    "seq, run_id, job_id, queue, state, phase, reason, exit_code, message, namespaces, attempt,"
    " lost_count, worker_id, worker_version, image_digest, outputs, log_bytes, queued_at,"
    " started_at, finished_at"
)


def to_record(row: Sequence[Any]) -> RunRecord:
    """A record from a row selected with RUN_COLUMNS (the store wrote it: no validation)."""
    (
        _seq,
        run_id,
        job_id,
        queue,
        state,
        phase,
        reason,
        exit_code,
        message,
        namespaces,
        attempt,
        lost_count,
        worker_id,
        worker_version,
        image_digest,
        outputs,
        log_bytes,
        queued_at,
        started_at,
        finished_at,
    ) = row
    return trusted(
        RunRecord,
        {
            "run_id": run_id,
            "job_id": job_id,
            "queue": queue,
            "state": STATES[state],
            "phase": _PHASES[phase] if phase else None,
            "reason": _REASONS[reason] if reason else None,
            "exit_code": exit_code,
            "message": message,
            "namespaces": json.loads(namespaces),
            "attempt": attempt,
            "lost_count": lost_count,
            "worker": _worker(worker_id, worker_version) if worker_id else None,
            "image_digest": image_digest,
            "cached": False,
            "outputs": _outputs(outputs) if outputs else {},
            "log_bytes": log_bytes,
            "queued_at": utc(queued_at),
            "started_at": utc(started_at),
            "finished_at": utc(finished_at),
        },
        ROW_FIELDS,
    )


_PHASES = {p.value: p for p in Phase}
_REASONS = {r.value: r for r in Reason}


def _worker(worker_id: str, version: str | None) -> WorkerRef:
    return trusted(WorkerRef, {"id": worker_id, "version": version})


def _outputs(text: str) -> dict[str, OutputRef]:
    return {
        p: trusted(OutputRef, {"key": o["key"], "size": o["size"]})
        for p, o in json.loads(text).items()
    }


def fetch_runs(c: sqlite3.Connection, where: str, args: Sequence[Any]) -> list[RunRecord]:
    """Records of the runs matching a WHERE clause (which may end in ORDER BY / LIMIT)."""
    return [to_record(r) for r in c.execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE {where}", args)]


def fetch_run(c: sqlite3.Connection, where: str, args: Sequence[Any]) -> RunRecord | None:
    """The first run matching a WHERE clause, or None."""
    row = c.execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE {where}", args).fetchone()
    return None if row is None else to_record(row)


def _fetch(c: sqlite3.Connection, seq: int) -> RunRecord:
    record = fetch_run(c, "seq = ?", (seq,))
    assert record is not None, seq
    return record


def set_holders(c: sqlite3.Connection, seq: int, namespaces: list[str]) -> None:
    """Replace a run's holders (the table for lookups, the JSON column for records)."""
    c.execute("DELETE FROM holders WHERE seq = ?", (seq,))
    c.executemany(
        "INSERT INTO holders (namespace, seq) VALUES (?, ?)", [(ns, seq) for ns in namespaces]
    )
    c.execute("UPDATE runs SET namespaces = ? WHERE seq = ?", (json.dumps(namespaces), seq))


def finish_run(
    c: sqlite3.Connection,
    seq: int,
    reason: Reason,
    message: str | None,
    now: float,
    also: str = "",
    also_args: Sequence[Any] = (),
) -> RunRecord:
    """Finish a run for good; a Success becomes the queue's cached result for its job. Its
    ``finished`` callbacks become due in the same transaction. ``also`` sets more columns in
    the same UPDATE (``", col = ?"``, with ``also_args``): one write of the row, not two."""
    c.execute(
        "UPDATE runs SET state = 2, phase = NULL, reason = ?, message = ?, finished_at = ?,"
        f" accessed_at = ?, cacheable = ?{also} WHERE seq = ?",
        (reason.value, message, now, now, int(reason is Reason.SUCCESS), *also_args, seq),
    )
    record = _fetch(c, seq)
    run_finished(c, seq, record, now)
    return record


def requeue_run(c: sqlite3.Connection, seq: int, *, counted: bool) -> RunRecord:
    """Put a running run back in the queue at its old place (its seq), counting a loss or not."""
    c.execute(
        "UPDATE runs SET state = 0, phase = NULL, worker_id = NULL, worker_version = NULL,"
        " started_at = NULL, lost_count = lost_count + ? WHERE seq = ?",
        (int(counted), seq),
    )
    return _fetch(c, seq)


def lose_run(c: sqlite3.Connection, seq: int, max_lost: int, now: float, why: str) -> RunRecord:
    """A run whose worker was lost: requeued, or finished WorkerLost at the max_lost-th loss."""
    lost = c.execute("SELECT lost_count FROM runs WHERE seq = ?", (seq,)).fetchone()[0] + 1
    if lost >= max_lost:
        c.execute("UPDATE runs SET lost_count = ? WHERE seq = ?", (lost, seq))
        message = f"{why}; its worker was lost {lost} times, the limit is {max_lost}"
        return finish_run(c, seq, Reason.WORKER_LOST, message, now)
    return requeue_run(c, seq, counted=True)
