"""Fill a host's store with many runs, fast: a benchmark helper, not part of the product.

The schema comes from the store itself (``SqliteStore.open`` applies its migrations); the rows
are then bulk-inserted with plain SQLite into its tables (``jobs``, ``runs``, ``holders``),
in one transaction without fsync — what thousands of real submissions would have left, in
seconds instead of hours. Run it on a data dir no host is using, then start the host on it.

What it writes: ``runs`` runs, each of its own job (``{"image": "bench/fill", "command":
["fill", "<i>"]}``, with its real job id), held by the default namespace. 98 % are finished
``Success`` (and so cached results), 2 % are queued; they are spread over 100 queues
``fill-00`` … ``fill-99``, except that a tenth of the finished ones are in ``busy_queue`` (the
queue the benchmark then uses), so its own indexes are big too.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from jupyter_compute_queue.host.store.sqlite import SqliteStore
from jupyter_compute_queue.model.jobs import job_id, parse_definition

CHUNK = 50_000


def definition(i: int) -> dict[str, object]:
    return {"image": "bench/fill", "command": ["fill", str(i)]}


def fast_job_id(i: int) -> str:
    """``jobs.job_id`` of ``definition(i)``, without parsing a million definitions (checked
    against the real one before the fill)."""
    canonical = json.dumps(
        {"command": ["fill", str(i)], "image": "bench/fill", "v": 1},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


async def create_schema(state: Path) -> None:
    store = SqliteStore(state)
    await store.open()
    await store.close()


def _rows(start: int, stop: int, busy_queue: str, now: float) -> Iterator[tuple[object, ...]]:
    for i in range(start, stop):
        queued = i % 50 == 0  # 2 %
        queue = busy_queue if (i % 10 == 1 and not queued) else f"fill-{i % 100:02d}"
        t = now - 86400 + i * 1e-3
        yield (
            uuid.uuid4().hex,
            fast_job_id(i),
            queue,
            0 if queued else 2,
            None if queued else "Success",
            None if queued else 0,
            '["_"]',
            0 if queued else 1,
            None if queued else "fill-worker",
            0 if queued else 1,
            t,
            None if queued else t + 0.1,
            None if queued else t + 0.2,
            t,
        )


def fill(state: Path, runs: int, busy_queue: str) -> float:
    """Insert ``runs`` runs into the store at ``state`` (schema already created); seconds."""
    for i in (0, 7, runs - 1):
        assert fast_job_id(i) == job_id(parse_definition(definition(i))), i
    started = time.perf_counter()
    now = time.time()
    conn = sqlite3.connect(state, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -1000000")
    conn.execute("BEGIN")
    for start in range(0, runs, CHUNK):
        stop = min(runs, start + CHUNK)
        conn.executemany(
            "INSERT INTO jobs (job_id, definition, created_at, accessed_at) VALUES (?, ?, ?, ?)",
            ((fast_job_id(i), json.dumps(definition(i)), now, now) for i in range(start, stop)),
        )
        first = conn.execute("SELECT coalesce(max(seq), 0) FROM runs").fetchone()[0] + 1
        conn.executemany(
            "INSERT INTO runs (run_id, job_id, queue, state, reason, exit_code, namespaces,"
            " attempt, worker_id, cacheable, queued_at, started_at, finished_at, accessed_at,"
            " req_cpus, req_memory, req_gpus, max_duration, tags)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1.0, 0, 0, 0, '')",
            _rows(start, stop, busy_queue, now),
        )
        conn.executemany(
            "INSERT INTO holders (namespace, seq) VALUES ('_', ?)",
            ((seq,) for seq in range(first, first + stop - start)),
        )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.perf_counter() - started
