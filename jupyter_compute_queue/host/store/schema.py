"""The SQLite schema as a list of migrations (``PRAGMA user_version`` = how many applied).

Released entries are never edited; a change of schema is a new entry at the end.
"""

from __future__ import annotations

# state: 0 Queued, 1 Running, 2 Finished (integers keep the partial indexes small).
# attempt: how many times the run was assigned; it is also the fence of the current assignment.
# req_* / max_duration / tags: the definition's claim-path fields, copied so that choosing a run
# for a worker never parses a definition. max_duration 0 means "the worker's own limit".
# seq: AUTOINCREMENT so that a number is never reused after a sweep and keyset cursors stay valid.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE jobs (
        job_id TEXT PRIMARY KEY,
        definition TEXT NOT NULL,
        created_at REAL NOT NULL,
        accessed_at REAL NOT NULL
    );
    CREATE INDEX jobs_accessed ON jobs(accessed_at);
    CREATE TABLE runs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id TEXT NOT NULL UNIQUE,
        job_id TEXT NOT NULL,
        queue TEXT NOT NULL,
        state INTEGER NOT NULL,
        phase TEXT,
        reason TEXT,
        exit_code INTEGER,
        message TEXT,
        namespaces TEXT NOT NULL DEFAULT '[]',
        attempt INTEGER NOT NULL DEFAULT 0,
        lost_count INTEGER NOT NULL DEFAULT 0,
        worker_id TEXT,
        worker_version TEXT,
        image_digest TEXT,
        outputs TEXT,
        log_bytes INTEGER NOT NULL DEFAULT 0,
        rerun INTEGER NOT NULL DEFAULT 0,
        cacheable INTEGER NOT NULL DEFAULT 0,
        req_cpus REAL NOT NULL,
        req_memory INTEGER NOT NULL,
        req_gpus INTEGER NOT NULL,
        max_duration INTEGER NOT NULL,
        tags TEXT NOT NULL,
        queued_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        accessed_at REAL NOT NULL
    );
    CREATE INDEX runs_claim ON runs(queue, seq) WHERE state = 0;
    CREATE UNIQUE INDEX runs_unfinished ON runs(queue, job_id) WHERE state != 2;
    CREATE INDEX runs_queue ON runs(queue, state, seq);
    CREATE INDEX runs_queue_all ON runs(queue, seq);
    CREATE INDEX runs_job ON runs(job_id, seq);
    CREATE INDEX runs_worker ON runs(worker_id) WHERE state = 1;
    CREATE INDEX runs_expiry ON runs(accessed_at) WHERE state = 2;
    CREATE TABLE holders (
        namespace TEXT NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (namespace, seq)
    ) WITHOUT ROWID;
    CREATE INDEX holders_seq ON holders(seq);
    CREATE TABLE workers (
        worker_id TEXT PRIMARY KEY,
        info TEXT NOT NULL,
        lease_expires REAL,
        last_seen REAL NOT NULL,
        registered_at REAL NOT NULL
    );
    CREATE TABLE blob_refs (
        key TEXT NOT NULL,
        owner TEXT NOT NULL,
        PRIMARY KEY (key, owner)
    ) WITHOUT ROWID;
    CREATE INDEX blob_refs_owner ON blob_refs(owner)
    """,
    # Callbacks of submissions (SPEC §11), kept until sent. seq: the run they are about;
    # due_at NULL: waiting for that run to finish; payload: the JSON body, set once due.
    """
    CREATE TABLE callbacks (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        seq INTEGER NOT NULL,
        event TEXT NOT NULL,
        url TEXT NOT NULL,
        namespace TEXT NOT NULL,
        payload TEXT,
        due_at REAL,
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL
    );
    CREATE INDEX callbacks_due ON callbacks(due_at) WHERE due_at IS NOT NULL;
    CREATE INDEX callbacks_waiting ON callbacks(seq) WHERE due_at IS NULL
    """,
]
