"""An answered submission is on disk (SPEC §10): kill the writing process, nothing answered is lost.

A child process submits jobs and prints each run id only after its submit returned; the parent
kills it with SIGKILL while it is still writing, reopens the file and finds every printed run.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import sys
from pathlib import Path

import pytest

import jupyter_compute_queue
from jupyter_compute_queue.host.store.sqlite import SqliteStore
from jupyter_compute_queue.model.runs import RunState

from .conftest import StoreFactory

PRINTED = 500
TIMEOUT = 60.0  # generous: the child starts an interpreter and imports pydantic

CHILD = """
import asyncio
import sys

from jupyter_compute_queue.model.jobs import job_id, parse_definition
from jupyter_compute_queue.host.store.base import SubmitRequest
from jupyter_compute_queue.host.store.sqlite import SqliteStore


async def main(path, mode):
    store = SqliteStore(path)
    await store.open()

    async def one(n):
        defn = parse_definition({"image": "busybox", "command": ["echo", str(n)]})
        request = SubmitRequest("q", defn, job_id(defn), "_")
        [result] = await store.submit([request], 1_800_000_000.0 + n)
        # Only now, after the submit answered, does anyone learn of this run.
        sys.stdout.write(result.record.run_id + "\\n")
        sys.stdout.flush()

    n = 0
    while True:  # keep writing until killed, so the kill lands in the middle of writes
        if mode == "sequential":
            await one(n)
            n += 1
        else:
            await asyncio.gather(*(one(n + i) for i in range(25)))
            n += 25


asyncio.run(main(sys.argv[1], sys.argv[2]))
"""

RUN_ID = re.compile(rb"^[0-9a-f]{32}\n$")


@pytest.mark.parametrize("mode", ["sequential", "gather"])
async def test_answered_submissions_survive_sigkill(
    tmp_path: Path, open_store: StoreFactory, mode: str
) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    path = tmp_path / "state.sqlite"
    root = str(Path(jupyter_compute_queue.__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        str(path),
        mode,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    printed: list[str] = []
    try:
        while len(printed) < PRINTED:
            line = await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)
            if not line:
                stderr = await proc.stderr.read()
                pytest.fail(f"the child ended early: {stderr.decode(errors='replace')}")
            assert RUN_ID.match(line), line
            printed.append(line.decode().strip())
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), TIMEOUT)
    assert proc.returncode == -signal.SIGKILL
    # Lines the child printed before it died, not read yet: they were answered too.
    rest = await asyncio.wait_for(proc.stdout.read(), TIMEOUT)
    printed += [line.decode() for line in rest.splitlines(keepends=True) if RUN_ID.match(line)]
    printed = [run_id.strip() for run_id in printed]
    assert len(set(printed)) == len(printed) >= PRINTED

    check = sqlite3.connect(path)
    try:
        assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        check.close()

    store: SqliteStore = await open_store(path)
    for run_id in printed:
        record = await store.get_run(run_id)
        assert record is not None, f"answered run {run_id} was lost"
        assert record.state is RunState.QUEUED
    counts = await store.counts("q")
    assert counts.by_state[RunState.QUEUED] >= len(printed)
