"""Per-run, append-only log files for container jobs.

A run's log is a UTF-8 byte stream stored as JSON-lines records ``{"o", "t", "s", "d"}`` where
``o`` is the byte offset of ``d`` in the uncut stream. Past ``max_bytes`` the middle is cut: the
head (first ``max_bytes // 2`` bytes) stays in ``head.jsonl`` and a rolling tail lives in up to
four ``tail-<start offset>.jsonl`` segments of ``max_bytes // 8`` bytes each.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Generator, Iterable, Iterator
from contextlib import ExitStack, closing, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ..model.log_records import LogRecord, LogStream

_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SEG_NAME = re.compile(r"tail-(\d{16})\.jsonl")
_O_PREFIX = re.compile(rb'\{"o":(\d+),')  # every stored line starts with its offset
_SURROGATE = re.compile("[\ud800-\udfff]")
_HEAD = "head.jsonl"
_KEEP = 4  # tail segments kept; the oldest is deleted when a fifth starts
# Longer appends are split into several records so that one record never makes a read, a
# binary-search step or a max_bytes-bounded page much bigger than this.
_MAX_RECORD = 64 * 1024
_SCAN = 64 * 1024  # below this span the binary search switches to a linear scan


@dataclass(slots=True)
class _Run:
    path: Path
    length: int = 0  # uncut stream length
    head_size: int = 0  # stream bytes in head.jsonl: the head is stream[:head_size]
    head_file: int = 0  # file bytes of head.jsonl
    segs: list[list[int]] = field(default_factory=list)  # [start offset, file bytes], oldest first
    fd: int | None = None  # append descriptor on the current file (newest segment, else head)


def _check_run_id(run_id: str) -> None:
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise ValueError(f"invalid run id {run_id!r}")


def _check_stream(stream: LogStream | str) -> str:
    try:
        return LogStream(stream).value
    except ValueError:
        raise ValueError(f"invalid log stream {stream!r}") from None


def _encode(data: str | bytes) -> tuple[str, bytes]:
    """Valid text and its UTF-8 bytes; invalid bytes and lone surrogates become U+FFFD."""
    if isinstance(data, bytes):
        text = data.decode("utf-8", "replace")
        return text, text.encode()
    try:
        return data, data.encode()
    except UnicodeEncodeError:  # lone surrogates, e.g. from surrogateescape-decoded output
        text = _SURROGATE.sub("\ufffd", data)
        return text, text.encode()


def _char_start(enc: bytes, i: int) -> int:
    """Move ``i`` back to the start of the UTF-8 character it falls in."""
    while 0 < i < len(enc) and enc[i] & 0xC0 == 0x80:
        i -= 1
    return i


def _line(o: int, t: int, s: str, d: str) -> bytes:
    rec = {"o": o, "t": t, "s": s, "d": d}
    return json.dumps(rec, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _parse(line: bytes) -> LogRecord:
    obj = json.loads(line)
    return LogRecord(obj["o"], obj["t"], obj["s"], obj["d"])


def _last_end(path: Path) -> tuple[int, int | None]:
    """(bytes of complete lines, end offset of the last record), cutting off a torn last line.

    A crash mid-write can leave a line without its newline; dropping it lets appends continue on
    a fresh line. Reads backwards, doubling the window until it holds one whole line.
    """
    with open(path, "r+b") as f:
        size, back = f.seek(0, os.SEEK_END), _SCAN
        while True:
            pos = max(0, size - back)
            f.seek(pos)
            data = f.read()
            last = data.rfind(b"\n")
            if pos == 0 or data.rfind(b"\n", 0, max(last, 0)) >= 0:
                break
            back *= 2
        f.truncate(pos + last + 1)
        if last < 0:
            return 0, None
        return pos + last + 1, _parse(data[data.rfind(b"\n", 0, last) + 1 : last + 1]).end


def _find_pos(f: BinaryIO, size: int, since: int) -> int:
    """File position of the last line (within ``size``) whose record starts at or before since.

    Offsets grow along the file, so bisect over byte positions instead of parsing everything.
    Invariant: a line starts at ``lo`` with o <= since; lines starting at or after ``hi`` have
    o > since.
    """
    lo, hi = 0, size
    while hi - lo > _SCAN:
        mid = (lo + hi) // 2
        f.seek(mid - 1)
        skipped = f.readline(hi - mid + 1)
        nxt = mid - 1 + len(skipped)
        m = _O_PREFIX.match(f.read(32)) if skipped.endswith(b"\n") and nxt < hi else None
        if m is not None and int(m.group(1)) <= since:
            lo = nxt
        else:
            hi = mid
    f.seek(lo)
    best, pos = lo, lo + len(f.readline())
    while pos < hi:
        line = f.readline()
        m = _O_PREFIX.match(line)
        if m is None or int(m.group(1)) > since:
            break
        best, pos = pos, pos + len(line)
    return best


def _file_records(f: BinaryIO, size: int, start: int, since: int) -> Iterator[LogRecord]:
    """Records of one file from ``since`` on, reading no further than ``size`` bytes."""
    pos = _find_pos(f, size, since) if since > start else 0
    f.seek(pos)
    while pos < size:
        line = f.readline()
        if not line.endswith(b"\n"):
            return  # a line still being written (or torn by a crash)
        pos += len(line)
        rec = _parse(line)
        if rec.o >= since:
            yield rec
            continue
        # since falls inside this record: its suffix, from the next character boundary on
        enc, i = rec.d.encode(), since - rec.o
        while i < len(enc) and enc[i] & 0xC0 == 0x80:
            i += 1
        if i < len(enc):
            yield LogRecord(rec.o + i, rec.t, rec.s, enc[i:].decode())


def _chunks(records: Generator[LogRecord, None, None], chunk_bytes: int) -> Iterator[str]:
    with closing(records):
        buf: list[str] = []
        n = 0
        for rec in records:
            buf.append(rec.d)
            n += len(rec.d.encode()) if rec.cut else rec.end - rec.o
            if n >= chunk_bytes:
                yield "".join(buf)
                buf, n = [], 0
        if buf:
            yield "".join(buf)


class LogStore:
    """Append-only per-run log files under ``root``; safe for one writer and many readers."""

    def __init__(
        self, root: str | os.PathLike[str], max_bytes: int = 16 * 1024 * 1024, max_open: int = 256
    ) -> None:
        """Store logs under ``root``, cutting each run's middle past ``max_bytes``."""
        if max_bytes < 64 or max_open < 1:
            raise ValueError("max_bytes must be >= 64 and max_open >= 1")
        self._root = Path(root)
        self._head_cap = max_bytes // 2
        self._seg = max_bytes // 8  # >= 8, so a fresh segment always fits one character
        self._max_open = max_open
        self._runs: OrderedDict[str, _Run] = OrderedDict()  # LRU of writer state + handles
        self._lock = threading.Lock()
        #: Runs this process made that have no log yet (see ``fresh``).
        self._fresh: set[str] = set()

    def append(
        self, run_id: str, stream: LogStream | str, data: str | bytes, t_ms: int | None = None
    ) -> int:
        """Append one frame; returns the run's new stream length (logBytes)."""
        return self.append_many(run_id, [(stream, data, t_ms)])

    def append_many(
        self, run_id: str, items: Iterable[tuple[LogStream | str, str | bytes, int | None]]
    ) -> int:
        """Append a batch of (stream, data, t_ms) frames; returns the new stream length."""
        _check_run_id(run_id)
        now = int(time.time() * 1000)
        # Validate the whole batch before writing so a bad item leaves nothing half-appended.
        batch = [(_check_stream(s), *_encode(d), now if t is None else t) for s, d, t in items]
        with self._lock:
            self._fresh.discard(run_id)
            run = self._state(run_id)
            try:
                self._write_batch(run, batch)
            except BaseException:
                # The files are the truth: forget the cached state and recover it on next use.
                self._forget(run_id)
                raise
            return run.length

    def _write_batch(self, run: _Run, batch: list[tuple[str, str, bytes, int]]) -> None:
        buf: list[bytes] = []  # lines for the current file, written in one call
        for s, text, enc, t in batch:
            pos = 0
            while pos < len(enc):
                in_head = not run.segs and run.length < self._head_cap
                if not in_head and len(enc) - pos > (_KEEP + 1) * self._seg:
                    # Every existing segment would be filled past and deleted: skip straight to
                    # the last few segments' worth instead of writing and deleting the rest.
                    skip = len(enc) - (_KEEP - 1) * self._seg
                    while enc[skip] & 0xC0 == 0x80:
                        skip += 1
                    self._flush(run, buf)
                    run.length += skip - pos
                    pos = skip
                    self._new_seg(run, keep=0)
                    continue
                if in_head:
                    room = self._head_cap - run.length
                else:
                    room = self._seg - (run.length - run.segs[-1][0]) if run.segs else 0
                # Records crossing the head cap or a segment end are split at a character
                # boundary: the head is then exactly the stream's start and no file outgrows its
                # cap, so stored bytes stay bounded even for one huge append.
                n = _char_start(enc, pos + min(room, _MAX_RECORD, len(enc) - pos)) - pos
                if n <= 0:
                    self._flush(run, buf)
                    self._new_seg(run, keep=_KEEP - 1)
                    continue
                d = text if n == len(enc) else enc[pos : pos + n].decode()
                buf.append(_line(run.length, t, s, d))
                pos += n
                run.length += n
                if in_head:
                    run.head_size = run.length
        self._flush(run, buf)

    def _flush(self, run: _Run, buf: list[bytes]) -> None:
        """Write pending lines to the current file with one unbuffered write (no fsync)."""
        if not buf:
            return
        data = b"".join(buf)
        buf.clear()
        if run.fd is None:
            run.path.mkdir(parents=True, exist_ok=True)
            path = self._seg_path(run, run.segs[-1][0]) if run.segs else run.path / _HEAD
            run.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        view = memoryview(data)
        while view:
            view = view[os.write(run.fd, view) :]
        if run.segs:
            run.segs[-1][1] += len(data)
        else:
            run.head_file += len(data)

    def _new_seg(self, run: _Run, keep: int) -> None:
        """Start a tail segment at the current length, deleting all but ``keep`` older ones."""
        if run.fd is not None:
            os.close(run.fd)
            run.fd = None
        while len(run.segs) > keep:
            with suppress(OSError):  # a leftover is cleaned up by the next recovery
                os.remove(self._seg_path(run, run.segs.pop(0)[0]))
        run.segs.append([run.length, 0])

    def size(self, run_id: str) -> int:
        """The run's uncut stream length (logBytes); 0 for an unknown run."""
        _check_run_id(run_id)
        with self._lock:
            run = self._runs.get(run_id)
            if run is not None:
                return run.length
            return 0 if run_id in self._fresh else self._state(run_id).length

    def fresh(self, run_id: str) -> None:
        """A run id this process just made: no log, so until an append (or ``close``) ``size``
        says 0 without asking the disk, a stat per run's result (benchmarks/RESULTS.md)."""
        with self._lock:
            self._fresh.add(run_id)

    def read_records(
        self, run_id: str, since: int = 0, max_bytes: int | None = None
    ) -> list[LogRecord]:
        """Records from stream offset ``since``; ``max_bytes`` bounds the text (>= 1 record)."""
        out: list[LogRecord] = []
        total = 0
        with closing(self._records(run_id, since)) as records:
            for rec in records:
                n = len(rec.d.encode())
                if out and max_bytes is not None and total + n > max_bytes:
                    break
                out.append(rec)
                total += n
        return out

    def iter_text(
        self, run_id: str, since: int = 0, chunk_bytes: int = 256 * 1024
    ) -> Iterator[str]:
        """The log text from ``since`` (truncation line included) in chunks of ~chunk_bytes."""
        return _chunks(self._records(run_id, since), chunk_bytes)  # validates before iterating

    def read_text(self, run_id: str, since: int = 0) -> str:
        """The whole log text from ``since``, truncation line included."""
        return "".join(self.iter_text(run_id, since))

    def _records(self, run_id: str, since: int) -> Generator[LogRecord, None, None]:
        _check_run_id(run_id)  # here, not in the generator, so bad input raises at the call
        if since < 0:
            raise ValueError(f"since must be >= 0, got {since}")
        return self._gen_records(run_id, since)

    def _gen_records(self, run_id: str, since: int) -> Generator[LogRecord, None, None]:
        with ExitStack() as stack:
            # Open under the lock so the writer cannot delete a segment between the snapshot
            # and the open; afterwards an unlinked file stays readable through our handle.
            files: list[tuple[BinaryIO, int, int]] = []  # (handle, complete bytes, start offset)
            with self._lock:
                run = self._state(run_id)
                if since >= run.length:
                    return
                if since < run.head_size:
                    head = stack.enter_context(open(run.path / _HEAD, "rb"))
                    files.append((head, run.head_file, 0))
                first_tail = len(files)  # index of the first tail file in files
                stops = [s for s, _ in run.segs[1:]] + [run.length]
                for (start, fsize), stop in zip(run.segs, stops, strict=False):
                    if stop > since:
                        seg = stack.enter_context(open(self._seg_path(run, start), "rb"))
                        files.append((seg, fsize, start))
                cut_at = max(since, run.head_size)
                # The cut is the gap between the head's end and the first kept tail segment
                # (that segment is then in files, as it ends past since).
                cut = run.segs[0][0] - cut_at if run.segs else 0
            for i, (f, fsize, start) in enumerate(files):
                records = _file_records(f, fsize, start, since)
                if cut > 0 and i == first_tail:
                    first = next(records, None)
                    t = first.t if first is not None else 0
                    yield LogRecord(cut_at, t, "sys", f"[... {cut} bytes of log cut ...]\n", cut)
                    if first is not None:
                        yield first
                yield from records

    def delete(self, run_id: str) -> None:
        """Remove the run's files; no error if it has none."""
        _check_run_id(run_id)
        with self._lock:
            self._forget(run_id)
            self._fresh.discard(run_id)
            path = self._root / run_id[:2] / run_id
            shutil.rmtree(path, ignore_errors=True)
            with suppress(OSError):  # only succeeds once no other run shares the prefix folder
                path.parent.rmdir()

    def close(self, run_id: str | None = None) -> None:
        """Close cached append handles (of one run, or all) and drop their cached state."""
        if run_id is not None:
            _check_run_id(run_id)
        with self._lock:
            for rid in list(self._runs) if run_id is None else [run_id]:
                self._forget(rid)
            if run_id is None:
                self._fresh.clear()
            else:
                self._fresh.discard(run_id)

    def _forget(self, run_id: str) -> None:
        run = self._runs.pop(run_id, None)
        if run is not None and run.fd is not None:
            os.close(run.fd)
            run.fd = None

    def _seg_path(self, run: _Run, start: int) -> Path:
        return run.path / f"tail-{start:016d}.jsonl"

    def _state(self, run_id: str) -> _Run:
        """Cached writer state (caller holds the lock), recovered from the files if needed."""
        run = self._runs.get(run_id)
        if run is not None:
            self._runs.move_to_end(run_id)
            return run
        run = self._load(run_id)
        self._runs[run_id] = run
        while len(self._runs) > self._max_open:
            self._forget(next(iter(self._runs)))
        return run

    def _load(self, run_id: str) -> _Run:
        """Rebuild writer state from disk (e.g. after a host restart)."""
        run = _Run(self._root / run_id[:2] / run_id)
        try:
            names = os.listdir(run.path)
        except FileNotFoundError:
            return run
        starts = sorted(int(m[1]) for n in names if (m := _SEG_NAME.fullmatch(n)))
        for old in starts[:-_KEEP]:  # left behind by a failed delete
            with suppress(OSError):
                os.remove(self._seg_path(run, old))
        starts = starts[-_KEEP:]
        if _HEAD in names:
            run.head_file, end = _last_end(run.path / _HEAD)
            run.head_size = run.length = end or 0
        run.segs = [[start, self._seg_path(run, start).stat().st_size] for start in starts]
        if starts:  # only the newest file can end in a torn line
            run.segs[-1][1], end = _last_end(self._seg_path(run, starts[-1]))
            run.length = starts[-1] if end is None else end
        return run
