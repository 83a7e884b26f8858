"""The benchmarks still run (benchmarks/run.py, at the smallest sizes); their targets are not
checked here: benchmarks are not tests."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import fill, run
from benchmarks.common import Figure, percentile
from jupyter_compute_queue.model.jobs import job_id, parse_definition

ROOT = Path(__file__).resolve().parents[1]


def test_a_tiny_run_prints_its_figures(tmp_path: Path) -> None:
    """The host benchmarks end to end (submission latency; scale, with a filled store)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--tiny", "--only", "submit,scale"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    names = [line.split(":", 1)[0] for line in done.stdout.splitlines()]
    assert names == [
        "submit_p50",
        "submit_batch100_p50",
        "cache_hit_p50",
        "scale_submit_ratio",
        "scale_assign_ratio",
        "scale_host_rss",
    ], done.stdout
    assert "(target p50 ≤ 3 ms: " in done.stdout and "baseline: GET healthz" in done.stdout
    assert "recorded in" not in done.stderr  # only a full run records its figures


def test_only_knows_the_benchmarks() -> None:
    assert run.parse(["--only", "logs,cancel", "--only", "scale"]).only == [
        "logs",
        "cancel",
        "scale",
    ]
    with pytest.raises(SystemExit):
        run.parse(["--only", "nope"])


def test_recording_replaces_only_the_generated_part(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text(f"# Results\n\nwritten by hand\n\n{run.BEGIN}\nold\n{run.END}\n\nafter\n")
    figure = Figure("x_ratio", 1.2, "x", "≤ 1.5", True, "direct 10 ms", "ours 12 ms")
    run.record(path, {"date": "today", "CPU": "some"}, [figure], quick=False)
    text = path.read_text()
    assert text.startswith("# Results\n\nwritten by hand\n") and text.endswith("\nafter\n")
    assert "old" not in text
    assert "| `x_ratio` | 1.20x | ≤ 1.5 | yes | direct 10 ms; ours 12 ms |" in text
    assert figure.line() == "x_ratio: 1.20x (target ≤ 1.5: met; baseline: direct 10 ms; ours 12 ms)"


def test_fill_writes_real_runs_through_the_store_schema(tmp_path: Path) -> None:
    state = tmp_path / "state.sqlite"
    asyncio.run(fill.create_schema(state))
    fill.fill(state, 500, "busy")
    conn = sqlite3.connect(state)
    counts = dict(conn.execute("SELECT state, count(*) FROM runs GROUP BY state").fetchall())
    assert counts == {0: 10, 2: 490}
    assert conn.execute("SELECT count(*) FROM holders").fetchone() == (500,)
    assert conn.execute("SELECT count(*) FROM runs WHERE queue = 'busy'").fetchone() == (50,)
    job, definition = conn.execute("SELECT job_id, definition FROM jobs LIMIT 1").fetchone()
    assert job == job_id(parse_definition(json.loads(definition)))


def test_percentile_interpolates() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 99) == 5
    assert percentile(list(range(101)), 95) == 95
