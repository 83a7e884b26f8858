"""The store's transactions, as plain functions of the writer's connection (they run inside
the engine's group transactions, in the writer thread; :mod:`.sqlite` wraps them in the async
store methods)."""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Sequence
from typing import Any

from ...model.capacity import DEFAULT_CPUS, Capacity
from ...model.runs import DEFAULT_NAMESPACE, Reason, RunRecord
from .base import (
    Assignment,
    Change,
    Conflict,
    Held,
    NotFound,
    SubmitRequest,
    SubmitResult,
    WorkerInfo,
)
from .callbacks import add_for_submission
from .rows import STATES, fetch_run, fetch_runs, finish_run, set_holders, to_record

#: "No limit" for SQL comparisons (SQLite integers are 64-bit).
UNLIMITED = 2**62
#: Reasons the host decides: a worker's late result for such a run is refused, not a duplicate.
_HOST_ENDED = {Reason.CANCELLED.value, Reason.REPLACED.value, Reason.WORKER_LOST.value}


def submit_one(c: sqlite3.Connection, req: SubmitRequest, now: float) -> SubmitResult:
    result = _submit_run(c, req, now)
    add_for_submission(c, req, result.record, result.outcome, now)
    return result


def _submit_run(c: sqlite3.Connection, req: SubmitRequest, now: float) -> SubmitResult:
    row = c.execute(
        "SELECT seq, namespaces, rerun FROM runs WHERE queue = ? AND job_id = ? AND state != 2",
        (req.queue, req.job_id),
    ).fetchone()
    joined_seq = row[0] if row else None
    released = _release_namespace(c, req.namespace, keep=joined_seq, now=now)
    if row is not None:
        holders = json.loads(row[1])
        if req.namespace not in holders:
            set_holders(c, row[0], [*holders, req.namespace])
        if req.rerun and not row[2]:
            c.execute("UPDATE runs SET rerun = 1 WHERE seq = ?", (row[0],))
        record = fetch_run(c, "seq = ?", (row[0],))
        return SubmitResult(record, "joined", released)  # type: ignore[arg-type]
    if not req.rerun:
        hit = _cached(c, req)
        if hit is not None:
            holders = json.loads(hit[1])
            if req.namespace not in holders:
                set_holders(c, hit[0], [*holders, req.namespace])
            c.execute("UPDATE runs SET accessed_at = ? WHERE seq = ?", (now, hit[0]))
            record = fetch_run(c, "seq = ?", (hit[0],))
            assert record is not None
            return SubmitResult(record.changed(cached=True), "cached", released)
    return SubmitResult(_insert_run(c, req, now), "new", released)


def _cached(c: sqlite3.Connection, req: SubmitRequest) -> tuple[int, str] | None:
    sql = "SELECT seq, namespaces FROM runs WHERE job_id = ? AND cacheable = 1 AND finished_at >= ?"
    args: list[Any] = [req.job_id, req.cache_since]
    if not req.cache_any_queue:
        sql += " AND queue = ?"
        args.append(req.queue)
    return c.execute(sql + " ORDER BY seq DESC LIMIT 1", args).fetchone()  # type: ignore[no-any-return]


def _release_namespace(
    c: sqlite3.Connection, namespace: str, keep: int | None, now: float
) -> list[Change]:
    """A non-default namespace holds at most one unfinished run: let go of the others."""
    if namespace == DEFAULT_NAMESPACE:
        return []
    changes = []
    for seq, holders_json, state, worker in c.execute(
        "SELECT r.seq, r.namespaces, r.state, r.worker_id FROM holders h JOIN runs r "
        "ON r.seq = h.seq WHERE h.namespace = ? AND r.state != 2",
        (namespace,),
    ).fetchall():
        if seq == keep:
            continue
        holders = [h for h in json.loads(holders_json) if h != namespace]
        set_holders(c, seq, holders)
        if holders:
            changes.append(Change(fetch_run(c, "seq = ?", (seq,)), changed=True))  # type: ignore[arg-type]
        else:
            message = f"replaced: {namespace} submitted another job"
            record = finish_run(c, seq, Reason.REPLACED, message, now)
            changes.append(Change(record, True, stop_on_worker=worker if state == 1 else None))
    return changes


def _insert_run(c: sqlite3.Connection, req: SubmitRequest, now: float) -> RunRecord:
    defn = req.definition
    c.execute(
        "INSERT INTO jobs (job_id, definition, created_at, accessed_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (job_id) DO UPDATE SET accessed_at = excluded.accessed_at",
        (req.job_id, req.stored or json.dumps(defn.wire(), ensure_ascii=False), now, now),
    )
    keys = defn.blob_keys()
    if keys:
        c.executemany(
            "INSERT OR IGNORE INTO blob_refs (key, owner) VALUES (?, ?)",
            [(key, f"j:{req.job_id}") for key in keys],
        )
    run_id = uuid.uuid4().hex
    namespaces = json.dumps([req.namespace])
    # The run is born with its one holder, and its record is made from what was inserted: no
    # second write of the row, no read back (what set_holders and fetch_run would do).
    cursor = c.execute(
        "INSERT INTO runs (run_id, job_id, queue, state, namespaces, rerun, req_cpus, req_memory,"
        " req_gpus, max_duration, tags, queued_at, accessed_at)"
        " VALUES (?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            run_id,
            req.job_id,
            req.queue,
            namespaces,
            int(req.rerun),
            defn.cpus if defn.cpus is not None else DEFAULT_CPUS,
            defn.memory or 0,
            defn.gpus,
            defn.max_duration or 0,
            json.dumps(defn.tags) if defn.tags else "",
            now,
            now,
        ),
    )
    seq = cursor.lastrowid
    assert seq is not None
    c.execute("INSERT INTO holders (namespace, seq) VALUES (?, ?)", (req.namespace, seq))
    # In RUN_COLUMNS' order: a queued run, nothing set yet but its holder and queued_at.
    row = (seq, run_id, req.job_id, req.queue, 0, None, None, None, None, namespaces, 0, 0)
    return to_record((*row, None, None, None, None, 0, now, None, None))


def claim_one(
    c: sqlite3.Connection, worker: WorkerInfo, free: Capacity, now: float
) -> Assignment | None:
    _check_lease(c, worker, now)
    memory = UNLIMITED if free.memory is None else free.memory
    best: int | None = None
    for queue in worker.queues:
        after = 0
        while True:
            rows = c.execute(
                "SELECT seq, tags FROM runs WHERE state = 0 AND queue = ? AND seq > ?"
                " AND req_cpus <= ? AND req_memory <= ? AND req_gpus <= ? AND max_duration <= ?"
                " ORDER BY seq LIMIT 64",
                (queue, after, free.cpus + 1e-9, memory, free.gpus, worker.max_duration),
            ).fetchall()
            fit = next((s for s, t in rows if not t or worker.tags.issuperset(json.loads(t))), None)
            if fit is not None or len(rows) < 64:
                break
            after = rows[-1][0]
        if fit is not None and (best is None or fit < best):
            best = fit
    if best is None:
        return None
    c.execute(
        "UPDATE runs SET state = 1, attempt = attempt + 1, worker_id = ?, worker_version = ?,"
        " started_at = ?, phase = NULL WHERE seq = ?",
        (worker.worker_id, worker.version, now, best),
    )
    record = fetch_run(c, "seq = ?", (best,))
    assert record is not None
    definition, cpus, mem, gpus = c.execute(
        "SELECT j.definition, r.req_cpus, r.req_memory, r.req_gpus FROM runs r"
        " JOIN jobs j ON j.job_id = r.job_id WHERE r.seq = ?",
        (best,),
    ).fetchone()
    return Assignment(record, json.loads(definition), record.attempt, Capacity(cpus, mem, gpus))


def claim_many(
    c: sqlite3.Connection, worker: WorkerInfo, free: Capacity, now: float, limit: int
) -> list[Assignment]:
    """Up to ``limit`` runs, oldest first, that fit together in ``free``.

    Taking runs in seq order while they fit is the same as claiming the oldest run that fits
    again and again (a run that does not fit now never fits in less room), with one lease
    check, one scan and one read of the claimed runs instead of one of each per run."""
    _check_lease(c, worker, now)
    cpus, memory, gpus = free.cpus, UNLIMITED if free.memory is None else free.memory, free.gpus
    after = dict.fromkeys(worker.queues, 0)
    taken: list[int] = []
    while after and len(taken) < limit:
        rows: list[tuple[int, str, float, int, int]] = []
        for queue in list(after):
            page = c.execute(
                "SELECT seq, tags, req_cpus, req_memory, req_gpus FROM runs"
                " WHERE state = 0 AND queue = ? AND seq > ? AND req_cpus <= ? AND req_memory <= ?"
                " AND req_gpus <= ? AND max_duration <= ? ORDER BY seq LIMIT 64",
                (queue, after[queue], cpus + 1e-9, memory, gpus, worker.max_duration),
            ).fetchall()
            if len(page) < 64:
                del after[queue]  # nothing queued there beyond this page fits
            else:
                after[queue] = page[-1][0]
            rows += page
        rows.sort()
        for seq, tags, run_cpus, run_memory, run_gpus in rows:
            if len(taken) >= limit:
                break
            if run_cpus > cpus + 1e-9 or run_memory > memory or run_gpus > gpus:
                continue
            if tags and not worker.tags.issuperset(json.loads(tags)):
                continue
            taken.append(seq)
            cpus, memory, gpus = cpus - run_cpus, memory - run_memory, gpus - run_gpus
    if not taken:
        return []
    c.executemany(
        "UPDATE runs SET state = 1, attempt = attempt + 1, worker_id = ?, worker_version = ?,"
        " started_at = ?, phase = NULL WHERE seq = ?",
        [(worker.worker_id, worker.version, now, seq) for seq in taken],
    )
    marks = ",".join("?" * len(taken))
    records = {r.run_id: r for r in fetch_runs(c, f"seq IN ({marks})", taken)}
    assignments = []
    for run_id, definition, run_cpus, run_memory, run_gpus in c.execute(
        "SELECT r.run_id, j.definition, r.req_cpus, r.req_memory, r.req_gpus FROM runs r"
        f" JOIN jobs j ON j.job_id = r.job_id WHERE r.seq IN ({marks}) ORDER BY r.seq",
        taken,
    ):
        record = records[run_id]
        assignments.append(
            Assignment(
                record,
                json.loads(definition),
                record.attempt,
                Capacity(run_cpus, run_memory, run_gpus),
            )
        )
    return assignments


def _check_lease(c: sqlite3.Connection, worker: WorkerInfo, now: float) -> None:
    lease = c.execute(
        "SELECT lease_expires FROM workers WHERE worker_id = ?", (worker.worker_id,)
    ).fetchone()
    if lease is None or lease[0] is None or lease[0] < now:
        raise NotFound(f"worker {worker.worker_id!r} has no live lease: register it again")


def forget_cached(c: sqlite3.Connection, queue: str, job_id: str) -> int:
    """Stop a job's Success runs in a queue from answering as cached results."""
    sql = "UPDATE runs SET cacheable = 0 WHERE queue = ? AND job_id = ? AND cacheable = 1"
    return c.execute(sql, (queue, job_id)).rowcount


def current_seq(
    c: sqlite3.Connection, run_id: str, fence: int, worker_id: str, *, running_only: bool
) -> int:
    """The run's seq if this worker's fence is the current one; Conflict otherwise."""
    row = c.execute(
        "SELECT seq, state, attempt, worker_id, reason FROM runs WHERE run_id = ?", (run_id,)
    ).fetchone()
    return fenced(row, run_id, fence, worker_id, running_only=running_only)


def fenced(
    row: Sequence[Any] | None, run_id: str, fence: int, worker_id: str, *, running_only: bool
) -> int:
    """:func:`current_seq` for a row that starts ``seq, state, attempt, worker_id, reason``."""
    if row is None:
        raise NotFound(f"run {run_id} does not exist")
    seq, state, attempt, holder, reason = row[:5]
    if attempt != fence or holder != worker_id or state == 0:
        raise Conflict(
            f"run {run_id} is no longer yours: it is at fence {attempt} "
            f"({STATES[state].value}) and your update carries fence {fence}"
        )
    if state == 2 and (running_only or reason in _HOST_ENDED):
        raise Conflict(f"run {run_id} has already finished ({reason}): stop it")
    return int(seq)


def held_runs(c: sqlite3.Connection, worker_id: str) -> list[Held]:
    return [
        Held(run_id, fence)
        for run_id, fence in c.execute(
            "SELECT run_id, attempt FROM runs WHERE state = 1 AND worker_id = ?", (worker_id,)
        )
    ]
