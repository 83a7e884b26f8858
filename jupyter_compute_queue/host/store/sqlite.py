"""The SQLite store: WAL, ``synchronous=FULL``, one writer with group commit (see engine.py).

Each public method is one transaction function run by the engine; the longer transactions
(submit, claim, fencing) are plain synchronous SQL in :mod:`.writes`.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from ...model.capacity import Capacity
from ...model.runs import Phase, Reason, RunRecord, RunState
from .base import (
    Assignment,
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
from .callbacks import CallbackQueries
from .engine import Engine
from .rows import (
    RUN_COLUMNS,
    STATE_CODE,
    fetch_run,
    fetch_runs,
    finish_run,
    lose_run,
    requeue_run,
    set_holders,
    to_record,
)
from .schema import MIGRATIONS
from .writes import (
    UNLIMITED,
    claim_many,
    claim_one,
    current_seq,
    fenced,
    forget_cached,
    held_runs,
    submit_one,
)

#: Reasons that mean the job itself failed: a rerun ending so removes the old cached result.
_JOB_FAILURES = {Reason.FAILED.value, Reason.ERROR.value, Reason.TIMED_OUT.value}
#: Why a run given back ``counted`` was lost (the start of its WorkerLost message).
LOST_UNDER_WORKER = "its worker lost it as it ran (e.g. its Docker engine went away)"


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
        return await self._engine.write(lambda c: [submit_one(c, r, now) for r in requests])

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
        before = UNLIMITED
        if cursor:
            try:
                before = int(cursor)
            except ValueError:
                before = -1
            if not 0 < before <= UNLIMITED:  # beyond SQLite's integers: none we gave out
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
        return await self._engine.write(lambda c: forget_cached(c, queue, job_id))

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
            return held_runs(c, worker_id)

        return await self._engine.write(tx)

    async def claim(self, worker: WorkerInfo, free: Capacity, now: float) -> Assignment | None:
        return await self._engine.write(lambda c: claim_one(c, worker, free, now))

    async def claim_many(
        self, worker: WorkerInfo, free: Capacity, now: float, limit: int
    ) -> list[Assignment]:
        return await self._engine.write(lambda c: claim_many(c, worker, free, now, limit))

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
            seq = current_seq(c, run_id, fence, worker_id, running_only=True)
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
            row = c.execute(
                "SELECT seq, state, attempt, worker_id, reason, job_id, queue, rerun FROM runs"
                " WHERE run_id = ?",
                (run_id,),
            ).fetchone()
            seq = fenced(row, run_id, fence, worker_id, running_only=False)
            state, job_id, queue, rerun = row[1], row[5], row[6], row[7]
            if state == 2:  # a duplicate, or a result for a run the host already ended
                return Change(fetch_run(c, "seq = ?", (seq,)), changed=False)  # type: ignore[arg-type]
            outputs = {p: o.model_dump() for p, o in outcome.outputs.items()}
            if outputs:
                c.executemany(
                    "INSERT OR IGNORE INTO blob_refs (key, owner) VALUES (?, ?)",
                    [(o.key, f"r:{seq}") for o in outcome.outputs.values()],
                )
            if rerun and outcome.reason.value in _JOB_FAILURES:
                forget_cached(c, queue, job_id)
            record = finish_run(
                c,
                seq,
                outcome.reason,
                outcome.message,
                now,
                ", outputs = ?, exit_code = ?, log_bytes = ?,"
                " image_digest = coalesce(?, image_digest)",
                (json.dumps(outputs), outcome.exit_code, outcome.log_bytes, outcome.image_digest),
            )
            return Change(record, changed=True)

        return await self._engine.write(tx)

    async def give_back(
        self,
        worker_id: str,
        run_ids: Collection[str] | None,
        *,
        now: float | None = None,
        max_lost: int | None = None,
    ) -> list[RunRecord]:
        wanted = None if run_ids is None else set(run_ids)
        if max_lost is not None and now is None:
            raise ValueError("a counted give-back needs the time (now)")

        def tx(c: sqlite3.Connection) -> list[RunRecord]:
            back = []
            for seq, run_id in c.execute(
                "SELECT seq, run_id FROM runs WHERE state = 1 AND worker_id = ?", (worker_id,)
            ).fetchall():
                if wanted is not None and run_id not in wanted:
                    continue
                if max_lost is None or now is None:
                    back.append(requeue_run(c, seq, counted=False))
                else:  # the same count, and the same end at max_lost, as an expired lease
                    back.append(lose_run(c, seq, max_lost, now, LOST_UNDER_WORKER))
            return back

        return await self._engine.write(tx)

    async def drop_worker(self, worker_id: str) -> None:
        def tx(c: sqlite3.Connection) -> None:
            if held_runs(c, worker_id):
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
