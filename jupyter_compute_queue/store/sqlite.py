"""The SQLite store: WAL, ``synchronous=FULL``, one writer with group commit (see engine.py).

Each public method is one transaction function run by the engine; the helpers below it are
plain synchronous SQL on the writer's connection.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
import uuid
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from ..runs import DEFAULT_NAMESPACE, Phase, Reason, RunRecord, RunState
from .base import (
    Assignment,
    Capacity,
    Change,
    Conflict,
    Held,
    NotFound,
    Outcome,
    Page,
    QueueCounts,
    Registration,
    Store,
    SubmitRequest,
    SubmitResult,
    Swept,
    WorkerInfo,
)
from .callbacks import CallbackQueries, add_for_submission
from .engine import Engine
from .rows import (
    DEFAULT_CPUS,
    RUN_COLUMNS,
    STATE_CODE,
    STATES,
    fetch_run,
    fetch_runs,
    finish_run,
    lose_run,
    requeue_run,
    set_holders,
    to_record,
)
from .schema import MIGRATIONS

_UNLIMITED = 2**62
#: Reasons that mean the job itself failed: a rerun ending so removes the old cached result.
_JOB_FAILURES = {Reason.FAILED.value, Reason.ERROR.value, Reason.TIMED_OUT.value}
#: Reasons the host decides: a worker's late result for such a run is refused, not a duplicate.
_HOST_ENDED = {Reason.CANCELLED.value, Reason.REPLACED.value, Reason.WORKER_LOST.value}


class SqliteStore(CallbackQueries, Store):
    """Durable state in one SQLite file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._engine = Engine(self.path, MIGRATIONS)
        self._phase_lock = threading.Lock()
        self._phases: dict[str, tuple[int, str, str, str | None]] = {}
        self._phase_write: asyncio.Future[None] | None = None

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        await self._engine.open()

    async def close(self) -> None:
        await self._engine.close()

    # --- jobs and submissions -------------------------------------------------------------

    async def submit(self, requests: Sequence[SubmitRequest], now: float) -> list[SubmitResult]:
        return await self._engine.write(lambda c: [_submit_one(c, r, now) for r in requests])

    async def get_definition(self, job_id: str) -> dict[str, Any] | None:
        def read(c: sqlite3.Connection) -> dict[str, Any] | None:
            row = c.execute("SELECT definition FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            return None if row is None else json.loads(row[0])

        return await self._engine.read(read)

    async def job_runs(self, job_id: str, queues: Collection[str] | None = None) -> list[RunRecord]:
        def read(c: sqlite3.Connection) -> list[RunRecord]:
            runs = fetch_runs(c, "job_id = ? ORDER BY seq DESC", (job_id,))
            return [r for r in runs if queues is None or r.queue in queues]

        return await self._engine.read(read)

    async def get_run(self, run_id: str) -> RunRecord | None:
        return await self._engine.read(lambda c: fetch_run(c, "run_id = ?", (run_id,)))

    async def list_runs(
        self,
        queue: str,
        *,
        states: Collection[RunState] = (),
        namespace: str | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> Page:
        before = _UNLIMITED
        if cursor:
            try:
                before = int(cursor)
            except ValueError:
                before = -1
            if not 0 < before <= _UNLIMITED:  # beyond SQLite's integers: none we gave out
                raise ValueError(f"cursor {cursor!r} is not one this host gave out")
        where = "queue = ? AND seq < ?"
        args: list[Any] = [queue, before]
        if states:
            codes = sorted({STATE_CODE[s] for s in states})
            where += f" AND state IN ({','.join('?' * len(codes))})"
            args += codes
        if namespace is not None:
            where += " AND seq IN (SELECT seq FROM holders WHERE namespace = ?)"
            args.append(namespace)

        def read(c: sqlite3.Connection) -> Page:
            rows = c.execute(
                f"SELECT {RUN_COLUMNS} FROM runs WHERE {where} ORDER BY seq DESC LIMIT ?",
                (*args, limit + 1),
            ).fetchall()
            more = len(rows) > limit
            rows = rows[:limit]
            return Page([to_record(r) for r in rows], str(rows[-1][0]) if more else None)

        return await self._engine.read(read)

    async def active_runs(self) -> list[RunRecord]:
        return await self._engine.read(lambda c: fetch_runs(c, "state != 2", ()))

    async def counts(self, queue: str) -> QueueCounts:
        def read(c: sqlite3.Connection) -> QueueCounts:
            by_state = {state: 0 for state in RunState}
            states = list(RunState)
            for code, count in c.execute(
                "SELECT state, count(*) FROM runs WHERE queue = ? GROUP BY state", (queue,)
            ):
                by_state[states[code]] = count
            oldest = c.execute(
                "SELECT queued_at FROM runs WHERE queue = ? AND state = 0 ORDER BY seq LIMIT 1",
                (queue,),
            ).fetchone()
            return QueueCounts(by_state, oldest[0] if oldest else None)

        return await self._engine.read(read)

    async def cancel(self, queue: str, job_id: str, namespace: str | None, now: float) -> Change:
        def tx(c: sqlite3.Connection) -> Change:
            row = c.execute(
                "SELECT seq, namespaces, state, worker_id FROM runs "
                "WHERE queue = ? AND job_id = ? AND state != 2",
                (queue, job_id),
            ).fetchone()
            if row is None:
                latest = fetch_run(
                    c, "queue = ? AND job_id = ? ORDER BY seq DESC LIMIT 1", (queue, job_id)
                )
                if latest is None:
                    raise NotFound(f"job {job_id} has no run in queue {queue!r}")
                return Change(latest, changed=False)
            seq, holders, state, worker = row[0], json.loads(row[1]), row[2], row[3]
            if namespace is not None:
                if namespace not in holders:
                    return Change(fetch_run(c, "seq = ?", (seq,)), changed=False)  # type: ignore[arg-type]
                holders.remove(namespace)
                set_holders(c, seq, holders)
                if holders:
                    return Change(fetch_run(c, "seq = ?", (seq,)), changed=True)  # type: ignore[arg-type]
            message = "cancelled" if namespace is None else f"cancelled: {namespace} let go"
            record = finish_run(c, seq, Reason.CANCELLED, message, now)
            return Change(record, changed=True, stop_on_worker=worker if state == 1 else None)

        return await self._engine.write(tx)

    async def forget(self, queue: str, job_id: str) -> int:
        return await self._engine.write(lambda c: _forget(c, queue, job_id))

    async def touch(self, run_ids: Collection[str], now: float) -> None:
        ids = list(run_ids)

        def tx(c: sqlite3.Connection) -> None:
            for run_id in ids:
                c.execute("UPDATE runs SET accessed_at = ? WHERE run_id = ?", (now, run_id))
                c.execute(
                    "UPDATE jobs SET accessed_at = ? WHERE job_id = "
                    "(SELECT job_id FROM runs WHERE run_id = ?)",
                    (now, run_id),
                )

        await self._engine.write(tx)

    # --- workers, leases, results ---------------------------------------------------------

    async def register_worker(
        self,
        worker: WorkerInfo,
        held: Sequence[Held],
        now: float,
        lease_seconds: float,
        max_lost: int,
    ) -> Registration:
        info = json.dumps(
            {
                "queues": list(worker.queues),
                "version": worker.version,
                "tags": sorted(worker.tags),
                "maxDuration": worker.max_duration,
                "capacity": {
                    "cpus": worker.capacity.cpus,
                    "memory": worker.capacity.memory,
                    "gpus": worker.capacity.gpus,
                },
            }
        )
        reported = {h.run_id: h.fence for h in held}

        def tx(c: sqlite3.Connection) -> Registration:
            c.execute(
                "INSERT INTO workers (worker_id, info, lease_expires, last_seen, registered_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (worker_id) DO UPDATE SET info = excluded.info,"
                " lease_expires = excluded.lease_expires, last_seen = excluded.last_seen",
                (worker.worker_id, info, now + lease_seconds, now, now),
            )
            kept: list[Held] = []
            lost: list[RunRecord] = []
            for seq, run_id, fence in c.execute(
                "SELECT seq, run_id, attempt FROM runs WHERE state = 1 AND worker_id = ?",
                (worker.worker_id,),
            ).fetchall():
                if reported.get(run_id) == fence:
                    kept.append(Held(run_id, fence))
                else:
                    lost.append(lose_run(c, seq, max_lost, now, "its worker restarted without it"))
            return Registration(kept, lost)

        return await self._engine.write(tx)

    async def heartbeat(self, worker_id: str, now: float, lease_seconds: float) -> list[Held]:
        def tx(c: sqlite3.Connection) -> list[Held]:
            updated = c.execute(
                "UPDATE workers SET lease_expires = ?, last_seen = ? WHERE worker_id = ?",
                (now + lease_seconds, now, worker_id),
            ).rowcount
            if not updated:
                raise NotFound(f"worker {worker_id!r} is not registered")
            return _held(c, worker_id)

        return await self._engine.write(tx)

    async def claim(self, worker: WorkerInfo, free: Capacity, now: float) -> Assignment | None:
        return await self._engine.write(lambda c: _claim(c, worker, free, now))

    async def claim_many(
        self, worker: WorkerInfo, free: Capacity, now: float, limit: int
    ) -> list[Assignment]:
        return await self._engine.write(lambda c: _claim_many(c, worker, free, now, limit))

    def set_phase_later(
        self, run_id: str, fence: int, worker_id: str, phase: Phase, image_digest: str | None
    ) -> asyncio.Future[None]:
        # Phases come four a run: they wait in a dict (the latest per run wins) for one write
        # that stores all of them, queued when the first arrives.
        with self._phase_lock:
            before = self._phases.get(run_id)
            if image_digest is None and before is not None:
                image_digest = before[3]
            self._phases[run_id] = (fence, worker_id, phase.value, image_digest)
            if self._phase_write is None:
                self._phase_write = self._engine.write_later(self._store_phases)
            return self._phase_write

    def _store_phases(self, c: sqlite3.Connection) -> None:
        with self._phase_lock:
            phases, self._phases = self._phases, {}
            self._phase_write = None
        c.executemany(
            "UPDATE runs SET phase = ?, image_digest = coalesce(?, image_digest)"
            " WHERE run_id = ? AND attempt = ? AND worker_id = ? AND state = 1",
            [
                (phase, digest, run_id, fence, worker)
                for run_id, (fence, worker, phase, digest) in phases.items()
            ],
        )

    async def set_phase(
        self, run_id: str, fence: int, worker_id: str, phase: Phase, image_digest: str | None
    ) -> RunRecord:
        def tx(c: sqlite3.Connection) -> RunRecord:
            seq = _current(c, run_id, fence, worker_id, running_only=True)
            c.execute(
                "UPDATE runs SET phase = ?, image_digest = coalesce(?, image_digest) WHERE seq = ?",
                (phase.value, image_digest, seq),
            )
            return fetch_run(c, "seq = ?", (seq,))  # type: ignore[return-value]

        return await self._engine.write(tx)

    async def finish(
        self, run_id: str, fence: int, worker_id: str, outcome: Outcome, now: float
    ) -> Change:
        def tx(c: sqlite3.Connection) -> Change:
            seq = _current(c, run_id, fence, worker_id, running_only=False)
            state, job_id, queue, rerun = c.execute(
                "SELECT state, job_id, queue, rerun FROM runs WHERE seq = ?", (seq,)
            ).fetchone()
            if state == 2:  # a duplicate, or a result for a run the host already ended
                return Change(fetch_run(c, "seq = ?", (seq,)), changed=False)  # type: ignore[arg-type]
            outputs = {p: o.model_dump() for p, o in outcome.outputs.items()}
            c.execute(
                "UPDATE runs SET outputs = ?, exit_code = ?, log_bytes = ?,"
                " image_digest = coalesce(?, image_digest) WHERE seq = ?",
                (
                    json.dumps(outputs),
                    outcome.exit_code,
                    outcome.log_bytes,
                    outcome.image_digest,
                    seq,
                ),
            )
            c.executemany(
                "INSERT OR IGNORE INTO blob_refs (key, owner) VALUES (?, ?)",
                [(o.key, f"r:{seq}") for o in outcome.outputs.values()],
            )
            if rerun and outcome.reason.value in _JOB_FAILURES:
                _forget(c, queue, job_id)
            record = finish_run(c, seq, outcome.reason, outcome.message, now)
            return Change(record, changed=True)

        return await self._engine.write(tx)

    async def give_back(self, worker_id: str, run_ids: Collection[str] | None) -> list[RunRecord]:
        wanted = None if run_ids is None else set(run_ids)

        def tx(c: sqlite3.Connection) -> list[RunRecord]:
            back = []
            for seq, run_id in c.execute(
                "SELECT seq, run_id FROM runs WHERE state = 1 AND worker_id = ?", (worker_id,)
            ).fetchall():
                if wanted is None or run_id in wanted:
                    back.append(requeue_run(c, seq, counted=False))
            return back

        return await self._engine.write(tx)

    async def drop_worker(self, worker_id: str) -> None:
        def tx(c: sqlite3.Connection) -> None:
            if _held(c, worker_id):
                raise Conflict(f"worker {worker_id!r} still holds runs: give them back first")
            c.execute("DELETE FROM workers WHERE worker_id = ?", (worker_id,))

        await self._engine.write(tx)

    async def expire_leases(self, now: float, max_lost: int) -> list[RunRecord]:
        def tx(c: sqlite3.Connection) -> list[RunRecord]:
            changed = []
            for (worker_id,) in c.execute(
                "SELECT worker_id FROM workers WHERE lease_expires < ?", (now,)
            ).fetchall():
                for (seq,) in c.execute(
                    "SELECT seq FROM runs WHERE state = 1 AND worker_id = ?", (worker_id,)
                ).fetchall():
                    changed.append(lose_run(c, seq, max_lost, now, "its worker's lease expired"))
                c.execute(
                    "UPDATE workers SET lease_expires = NULL WHERE worker_id = ?", (worker_id,)
                )
            return changed

        return await self._engine.write(tx)

    async def extend_leases(self, now: float, lease_seconds: float) -> None:
        await self._engine.write(
            lambda c: c.execute(
                "UPDATE workers SET lease_expires = ? WHERE lease_expires IS NOT NULL",
                (now + lease_seconds,),
            )
        )

    async def workers(self, queue: str | None = None) -> list[dict[str, Any]]:
        def read(c: sqlite3.Connection) -> list[dict[str, Any]]:
            running: dict[str, list[dict[str, str]]] = {}
            for worker_id, run_id, run_queue in c.execute(
                "SELECT worker_id, run_id, queue FROM runs"
                " WHERE state = 1 AND worker_id IS NOT NULL"
            ):
                running.setdefault(worker_id, []).append({"runId": run_id, "queue": run_queue})
            out = []
            for worker_id, info, lease, seen in c.execute(
                "SELECT worker_id, info, lease_expires, last_seen FROM workers ORDER BY worker_id"
            ):
                data = json.loads(info)
                if queue is not None and queue not in data["queues"]:
                    continue
                data.update(
                    id=worker_id,
                    leaseExpires=lease,
                    lastSeen=seen,
                    running=running.get(worker_id, []),
                )
                out.append(data)
            return out

        return await self._engine.read(read)

    # --- retention ------------------------------------------------------------------------

    async def sweep(self, cutoff: float, batch: int) -> Swept:
        def tx(c: sqlite3.Connection) -> Swept:
            rows = c.execute(
                "SELECT seq, run_id FROM runs WHERE state = 2 AND accessed_at < ? LIMIT ?",
                (cutoff, batch),
            ).fetchall()
            for seq, _ in rows:
                c.execute("DELETE FROM holders WHERE seq = ?", (seq,))
                c.execute("DELETE FROM blob_refs WHERE owner = ?", (f"r:{seq}",))
                c.execute("DELETE FROM runs WHERE seq = ?", (seq,))
            jobs = c.execute(
                "SELECT job_id FROM jobs WHERE accessed_at < ? AND NOT EXISTS "
                "(SELECT 1 FROM runs WHERE runs.job_id = jobs.job_id) LIMIT ?",
                (cutoff, batch),
            ).fetchall()
            for (job_id,) in jobs:
                c.execute("DELETE FROM blob_refs WHERE owner = ?", (f"j:{job_id}",))
                c.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))
            c.execute(
                "DELETE FROM workers WHERE lease_expires IS NULL AND last_seen < ?", (cutoff,)
            )
            return Swept([run_id for _, run_id in rows], len(jobs))

        return await self._engine.write(tx)

    async def referenced_blobs(self, keys: Collection[str]) -> set[str]:
        wanted = list(keys)

        def read(c: sqlite3.Connection) -> set[str]:
            found = set()
            for key in wanted:
                if c.execute("SELECT 1 FROM blob_refs WHERE key = ? LIMIT 1", (key,)).fetchone():
                    found.add(key)
            return found

        return await self._engine.read(read)


# --- transaction helpers (writer thread) ----------------------------------------------------


def _submit_one(c: sqlite3.Connection, req: SubmitRequest, now: float) -> SubmitResult:
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
            return SubmitResult(record.model_copy(update={"cached": True}), "cached", released)
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
        (req.job_id, json.dumps(defn.wire(), ensure_ascii=False), now, now),
    )
    c.executemany(
        "INSERT OR IGNORE INTO blob_refs (key, owner) VALUES (?, ?)",
        [(key, f"j:{req.job_id}") for key in defn.blob_keys()],
    )
    cursor = c.execute(
        "INSERT INTO runs (run_id, job_id, queue, state, namespaces, rerun, req_cpus, req_memory,"
        " req_gpus, max_duration, tags, queued_at, accessed_at)"
        " VALUES (?, ?, ?, 0, '[]', ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            uuid.uuid4().hex,
            req.job_id,
            req.queue,
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
    set_holders(c, seq, [req.namespace])
    return fetch_run(c, "seq = ?", (seq,))  # type: ignore[return-value]


def _claim(
    c: sqlite3.Connection, worker: WorkerInfo, free: Capacity, now: float
) -> Assignment | None:
    _check_lease(c, worker, now)
    memory = _UNLIMITED if free.memory is None else free.memory
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


def _claim_many(
    c: sqlite3.Connection, worker: WorkerInfo, free: Capacity, now: float, limit: int
) -> list[Assignment]:
    """Up to ``limit`` runs, oldest first, that fit together in ``free``.

    Taking runs in seq order while they fit is the same as claiming the oldest run that fits
    again and again (a run that does not fit now never fits in less room), with one lease
    check, one scan and one read of the claimed runs instead of one of each per run."""
    _check_lease(c, worker, now)
    cpus, memory, gpus = free.cpus, _UNLIMITED if free.memory is None else free.memory, free.gpus
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


def _forget(c: sqlite3.Connection, queue: str, job_id: str) -> int:
    """Stop a job's Success runs in a queue from answering as cached results."""
    sql = "UPDATE runs SET cacheable = 0 WHERE queue = ? AND job_id = ? AND cacheable = 1"
    return c.execute(sql, (queue, job_id)).rowcount


def _current(
    c: sqlite3.Connection, run_id: str, fence: int, worker_id: str, *, running_only: bool
) -> int:
    """The run's seq if this worker's fence is the current one; Conflict otherwise."""
    row = c.execute(
        "SELECT seq, state, attempt, worker_id, reason FROM runs WHERE run_id = ?", (run_id,)
    ).fetchone()
    if row is None:
        raise NotFound(f"run {run_id} does not exist")
    seq, state, attempt, holder, reason = row
    if attempt != fence or holder != worker_id or state == 0:
        raise Conflict(
            f"run {run_id} is no longer yours: it is at fence {attempt} "
            f"({STATES[state].value}) and your update carries fence {fence}"
        )
    if state == 2 and (running_only or reason in _HOST_ENDED):
        raise Conflict(f"run {run_id} has already finished ({reason}): stop it")
    return int(seq)


def _held(c: sqlite3.Connection, worker_id: str) -> list[Held]:
    return [
        Held(run_id, fence)
        for run_id, fence in c.execute(
            "SELECT run_id, attempt FROM runs WHERE state = 1 AND worker_id = ?", (worker_id,)
        )
    ]
