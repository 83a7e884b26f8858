"""What the CLI's job and queue commands print: tables, summaries, and progress on a terminal.

Progress (uploads, downloads, waiting) is one line on stderr, redrawn in place, and only when
stderr is a terminal; piped or redirected output never gets it. The lines that say what
happened (a job queued, a job finished, files written) are printed whatever stderr is.
"""

from __future__ import annotations

import contextlib
import queue as queue_module
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ..client.errors import ComputeQueueError
from ..client.uploads import ProgressCallback, human_size

if TYPE_CHECKING:
    from ..client.client import Job
    from ..model.log_records import LogRecord
    from ..model.runs import RunRecord

#: How many hex digits of a job or run id the CLI shows.
SHORT = 12
#: The prefix of the CLI's own lines on stderr.
PREFIX = "compute-queue:"


class Interrupted(Exception):
    """Ctrl-C while following a job; the message says how to cancel it (exit 130)."""


def short(ident: str) -> str:
    return ident[:SHORT]


def note(message: str) -> None:
    """One line on stderr, whatever stderr is."""
    sys.stderr.write(f"{PREFIX} {message}\n")
    sys.stderr.flush()


def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def span(seconds: float | None) -> str:
    """``5s``, ``3m12s``, ``2h05m``, ``4d03h``: compact and readable in a column."""
    if seconds is None:
        return "-"
    whole = max(0, int(seconds))
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def since(moment: datetime | None, now: datetime) -> float | None:
    return None if moment is None else (now - moment).total_seconds()


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart (the last one not padded)."""
    lines = [list(header), *(list(row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for line in lines:
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=True)]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def runs_table(runs: Sequence[RunRecord], now: datetime | None = None) -> str:
    """``job list``: one row per run, newest first, as the host answered."""
    now = now or datetime.now(timezone.utc)
    rows = []
    for run in runs:
        started = run.started_at
        took = since(started, run.finished_at or now) if started else None
        detail = run.reason.value if run.reason else (run.phase.value if run.phase else "")
        rows.append(
            [
                short(run.run_id),
                short(run.job_id),
                run.state.value,
                detail,
                "" if run.exit_code is None else str(run.exit_code),
                span(since(run.queued_at, now)),
                "" if took is None else span(took),
                ",".join(run.namespaces),
            ]
        )
    header = ["RUN", "JOB", "STATE", "REASON/PHASE", "EXIT", "AGE", "TOOK", "HOLDERS"]
    return table(header, rows)


def status_summary(data: Mapping[str, Any], now: float | None = None) -> str:
    """``queue status``: counts, the oldest queued run, then one line per worker."""
    now = time.time() if now is None else now
    counts = data.get("counts") or {}
    parts = [f"{counts.get(state, 0)} {state.lower()}" for state in ("Queued", "Running")]
    parts.append(f"{counts.get('Finished', 0)} finished")
    oldest = data.get("oldestQueuedSeconds")
    waiting = f"; oldest queued {span(oldest)} ago" if oldest is not None else ""
    lines = [f"queue {data.get('queue')}: {', '.join(parts)}{waiting}"]
    workers = data.get("workers") or []
    connected = sum(1 for w in workers if w.get("connected"))
    lines.append(f"workers: {connected} connected of {len(workers)} known")
    rows = []
    for worker in workers:
        capacity = worker.get("capacity") or {}
        memory = capacity.get("memory")
        seen = worker.get("lastSeen")
        rows.append(
            [
                str(worker.get("id")),
                "connected" if worker.get("connected") else "gone",
                f"{capacity.get('cpus', 0):g}",
                "-" if memory is None else human_size(memory),
                str(capacity.get("gpus", 0)),
                str(len(worker.get("running") or [])),
                "-" if seen is None else span(now - float(seen)) + " ago",
                ",".join(worker.get("tags") or []) or "-",
                str(worker.get("version") or "-"),
            ]
        )
    if rows:
        header = ["WORKER", "STATE", "CPUS", "MEMORY", "GPUS", "RUNNING", "SEEN", "TAGS", "VERSION"]
        lines.extend("  " + line for line in table(header, rows).splitlines())
    return "\n".join(lines)


class StatusLine:
    """A line on stderr redrawn in place, only when stderr is a terminal (at most ten times a
    second); ``clear()`` before writing anything else to the terminal."""

    def __init__(self) -> None:
        self.enabled = is_terminal(sys.stderr)
        self._shown = False
        self._at = 0.0

    def show(self, text: str) -> None:
        now = time.monotonic()
        if not self.enabled or now - self._at < 0.1:
            return
        self._at = now
        sys.stderr.write(f"\r\x1b[K{PREFIX} {text}")
        sys.stderr.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self._shown = False

    def transfer(self, verb: str) -> ProgressCallback:
        """A progress callback ``(done, total)`` for a download (total 0: unknown)."""

        def update(done: int, total: int) -> None:
            if total:
                percent = 100 * done // total
                self.show(f"{verb} {human_size(done)} of {human_size(total)} ({percent}%)")
            else:
                self.show(f"{verb} {human_size(done)}")

        return update


# --- following a job -------------------------------------------------------------------------


def follow(job: Job, logs: bool, timeout: float | None) -> None:
    """Wait for the run to finish (a background thread does; this one stays responsive to
    Ctrl-C). With ``logs`` its log is printed live meanwhile: the container's stdout to stdout,
    its stderr and the system's lines to stderr, as ``docker run`` does. On a terminal a status
    line says what the job is doing until its log starts."""
    items: queue_module.Queue[LogRecord | BaseException | None] = queue_module.Queue(256)

    def work() -> None:
        try:
            if not logs:
                job.wait(timeout)
            else:
                with job.stream_logs(timeout=timeout) as stream:
                    for record in stream:
                        items.put(record)
                if not job.refresh().finished:  # the log ends with the run; to be sure
                    job.wait(timeout)
        except BaseException as exc:
            items.put(exc)
        else:
            items.put(None)

    threading.Thread(target=work, name="compute-queue-follow", daemon=True).start()
    line = StatusLine()
    started = asked = time.monotonic()
    printing = False
    try:
        while True:
            try:
                item = items.get(timeout=0.25)
            except queue_module.Empty:
                if line.enabled and not printing:
                    if logs and time.monotonic() - asked > 2:  # wait() keeps it fresh otherwise
                        asked = time.monotonic()
                        with contextlib.suppress(ComputeQueueError):  # only the status line
                            job.refresh()
                    phase = f" ({job.phase})" if job.phase else ""
                    elapsed = span(time.monotonic() - started)
                    line.show(f"job {short(job.job_id)} {job.state}{phase}, {elapsed}")
                continue
            line.clear()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            printing = True
            stream = sys.stdout if item.s == "out" else sys.stderr
            stream.write(item.d)
            stream.flush()
    except KeyboardInterrupt:
        line.clear()
        raise Interrupted(
            f"stopped following job {short(job.job_id)}; it goes on. Cancel it with: "
            f"jupyter compute-queue job cancel {job.job_id} --queue {job.queue}"
        ) from None


def download(job: Job, folder: Path) -> list[Path]:
    line = StatusLine()
    try:
        written = job.download(folder, progress=line.transfer("downloading outputs:"))
    finally:
        line.clear()
    return list(written.values())
