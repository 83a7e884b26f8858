"""What machine the figures were measured on."""

from __future__ import annotations

import os
import platform
import sqlite3
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from .common import percentile


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024**2:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _docker() -> str:
    try:
        import docker

        version = docker.from_env().version()
        return f"{version.get('Version')} (API {version.get('ApiVersion')})"
    except Exception as exc:  # the container benchmarks will say so too
        return f"not reachable ({exc})"


def _load() -> str:
    try:
        one, five, _ = os.getloadavg()
        return f"{one:.1f} (1 min), {five:.1f} (5 min)"
    except OSError:
        return "unknown"


def fsync_commit_ms(folder: Path, n: int = 100) -> tuple[float, float]:
    """p50 and p99 of an fsync'd SQLite commit (WAL, ``synchronous=FULL``, as the store runs)
    of one small row in ``folder``: the floor under every write the host answers."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fsync-probe.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS t (x)")
    times = []
    for i in range(n):
        start = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t VALUES (?)", (i,))
        conn.execute("COMMIT")
        times.append((time.perf_counter() - start) * 1000)
    conn.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return percentile(times, 50), percentile(times, 99)


def describe(workdir: Path) -> dict[str, str]:
    p50, p99 = fsync_commit_ms(workdir)
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "CPU": f"{_cpu_model()}, {os.cpu_count()} cores",
        "RAM": _ram(),
        "kernel": f"{platform.system()} {platform.release()}",
        "Docker engine": _docker(),
        "Python": f"{platform.python_implementation()} {sys.version.split()[0]}",
        "SQLite": sqlite3.sqlite_version,
        "fsync'd SQLite commit": f"p50 {p50:.2f} ms, p99 {p99:.2f} ms (WAL, synchronous=FULL)",
        "load average at start": _load(),
    }
