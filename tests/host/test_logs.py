"""Tests for jupyter_compute_queue.host.logs: offsets, since, truncation, recovery, concurrency."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jupyter_compute_queue.host.logs import LogStore, LogStream
from jupyter_compute_queue.model.log_records import LogRecord

ALPHABET = "ab \n\té€中😀"


def suffix(stream: bytes, since: int) -> str:
    """The stream from since, moved forward to a character boundary."""
    while since < len(stream) and stream[since] & 0xC0 == 0x80:
        since += 1
    return stream[since:].decode()


def random_text(rnd: random.Random, max_len: int) -> str:
    return "".join(rnd.choice(ALPHABET) for _ in range(rnd.randint(1, max_len)))


def check_contiguous(records: list[LogRecord]) -> None:
    for prev, rec in itertools.pairwise(records):
        assert rec.o == prev.end


def stored_records(run_dir: Path) -> dict[str, list[dict[str, object]]]:
    return {
        p.name: [json.loads(line) for line in p.read_text("utf-8").splitlines()]
        for p in sorted(run_dir.iterdir())
    }


def test_offsets_and_end_with_multibyte_and_invalid_bytes(tmp_path: Path) -> None:
    store = LogStore(tmp_path)
    rnd = random.Random(7)
    stream = b""
    for i in range(300):
        if i % 7 == 0:
            data: str | bytes = b"ok\xff\xfe" + "é".encode() + b"\xe2\x82"  # invalid + truncated
            text = "ok\ufffd\ufffdé\ufffd"
        else:
            data = text = random_text(rnd, 30)
        stream += text.encode()
        s = [LogStream.OUT, "err", LogStream.SYS][i % 3]
        assert store.append("run-1", s, data, t_ms=1000 + i) == len(stream)
    assert store.append("run-1", "out", "") == len(stream)  # empty data is a no-op
    assert store.append("run-1", "out", b"") == len(stream)
    assert store.size("run-1") == len(stream)
    records = store.read_records("run-1")
    assert records[0].o == 0 and records[-1].end == len(stream)
    check_contiguous(records)
    for rec in records:
        assert rec.d.encode() == stream[rec.o : rec.end] and rec.cut == 0
    assert "".join(r.d for r in records) == stream.decode()
    assert [r.s for r in records[:3]] == ["out", "err", "sys"]
    assert [r.t for r in records[:3]] == [1000, 1001, 1002]
    assert "\ufffd" in records[0].d


def test_lone_surrogate_becomes_replacement_char(tmp_path: Path) -> None:
    store = LogStore(tmp_path)
    n = store.append("r", "out", "a\udcffb")
    assert store.read_text("r") == "a\ufffdb" and n == len("a\ufffdb".encode())


def test_append_many_equals_appending_each(tmp_path: Path) -> None:
    items: list[tuple[LogStream | str, str | bytes, int | None]] = [
        ("out", "héllo\n", 1),
        (LogStream.ERR, b"bad \xc3(\n", 2),
        ("sys", "", 3),
        ("out", "😀" * 10, None),
    ]
    a, b = LogStore(tmp_path / "a"), LogStore(tmp_path / "b")
    n = a.append_many("x", items)
    for s, d, t in items:
        m = b.append("x", s, d, t)
    assert n == m == b.size("x")
    ra, rb = a.read_records("x"), b.read_records("x")
    assert [(r.o, r.s, r.d) for r in ra] == [(r.o, r.s, r.d) for r in rb]
    assert ra[0].t == 1 and ra[1].t == 2 and ra[-1].t > 10**12  # None means now, in ms


def test_since_positions(tmp_path: Path) -> None:
    store = LogStore(tmp_path)
    parts = ["abc", "€uro", "x😀y", "end\n"]
    for p in parts:
        store.append("r", "out", p)
    stream = "".join(parts).encode()
    assert store.read_text("r", 0) == stream.decode()
    assert store.read_records("r", 3)[0] == store.read_records("r")[1]  # a record start
    inside = store.read_records("r", 1)
    assert inside[0].o == 1 and inside[0].d == "bc"
    # Inside the 3-byte "€" (offsets 3..5): moved forward to the next character, "u" at 6.
    for since in (4, 5):
        recs = store.read_records("r", since)
        assert recs[0].o == 6 and recs[0].d == "uro"
        assert store.read_text("r", since) == suffix(stream, since)
    # Inside the 4-byte emoji of "x😀y" (x at 9, emoji at 10..13, y at 14).
    assert store.read_records("r", 10)[0].d == "😀y"
    recs = store.read_records("r", 11)
    assert (recs[0].o, recs[0].d) == (14, "y")
    # Inside a character that ends its record: the next record starts the answer.
    store.append("r2", "out", "a€")
    store.append("r2", "out", "b")
    recs = store.read_records("r2", 2)
    assert [(r.o, r.d) for r in recs] == [(4, "b")]
    assert store.read_records("r", len(stream)) == []
    assert store.read_text("r", len(stream)) == ""
    assert store.read_records("r", len(stream) + 100) == []
    assert store.read_records("unknown") == [] and store.size("unknown") == 0
    for since in range(len(stream) + 2):
        assert store.read_text("r", since) == suffix(stream, since)


def test_read_records_max_bytes(tmp_path: Path) -> None:
    store = LogStore(tmp_path)
    for i in range(10):
        store.append("r", "out", f"{i:09d}\n")  # 10 bytes each
    assert len(store.read_records("r", max_bytes=35)) == 3
    assert len(store.read_records("r", max_bytes=1)) == 1  # at least one record
    assert len(store.read_records("r", since=95, max_bytes=1)) == 1
    assert len(store.read_records("r")) == 10


def write_random(store: LogStore, run_id: str, total: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    stream = b""
    while len(stream) < total:
        text = random_text(rnd, 80)
        stream += text.encode()
        store.append(run_id, rnd.choice(["out", "err"]), text, t_ms=len(stream))
    return stream


def test_truncation_keeps_exact_head_and_tail(tmp_path: Path) -> None:
    max_bytes = 4096
    store = LogStore(tmp_path, max_bytes=max_bytes)
    stream = write_random(store, "trunc", 60_000, seed=3)
    assert store.size("trunc") == len(stream)
    records = store.read_records("trunc")
    cuts = [i for i, r in enumerate(records) if r.cut]
    assert len(cuts) == 1
    k = cuts[0]
    cut_rec, head, tail = records[k], records[:k], records[k + 1 :]
    head_bytes = "".join(r.d for r in head).encode()
    tail_bytes = "".join(r.d for r in tail).encode()
    # The head is the exact start of the stream, cut at most 3 bytes short of the cap.
    assert stream.startswith(head_bytes) and max_bytes // 2 - 3 <= len(head_bytes) <= 2048
    assert stream.endswith(tail_bytes) and len(tail_bytes) >= 3 * max_bytes // 8
    assert cut_rec.o == len(head_bytes) and cut_rec.o + cut_rec.cut == tail[0].o
    assert cut_rec.end == tail[0].o and cut_rec.s == "sys"
    assert cut_rec.d == f"[... {cut_rec.cut} bytes of log cut ...]\n"
    assert cut_rec.t == tail[0].t
    assert len(head_bytes) + cut_rec.cut + len(tail_bytes) == len(stream)
    check_contiguous(records)
    for rec in head + tail:
        assert rec.d.encode() == stream[rec.o : rec.end]
    # Stored data is bounded: head + at most 4 segments of max_bytes // 8.
    files = stored_records(tmp_path / "tr" / "trunc")
    assert sum(1 for name in files if name.startswith("tail-")) <= 4
    data_bytes = sum(len(str(r["d"]).encode()) for lines in files.values() for r in lines)
    assert data_bytes <= max_bytes
    disk = sum(p.stat().st_size for p in (tmp_path / "tr" / "trunc").iterdir())
    assert disk <= 3 * max_bytes  # JSON overhead on ~45-byte records, nothing unbounded
    for name, lines in files.items():
        if name.startswith("tail-"):
            assert lines[0]["o"] == int(name[5:21])
    # since inside the cut: the truncation record starts at since and covers the rest.
    for since in (cut_rec.o, cut_rec.o + 1, tail[0].o - 1):
        recs = store.read_records("trunc", since)
        assert recs[0].cut == tail[0].o - since and recs[0].o == since
        assert recs[1:] == tail
    # since in the head: the head's suffix, then the cut, then the tail.
    recs = store.read_records("trunc", 100)
    head_part = suffix(stream[: len(head_bytes)], 100)
    assert "".join(r.d for r in recs if not r.cut) == head_part + tail_bytes.decode()
    # since in the tail: an exact suffix of the stream, no truncation record.
    for since in (tail[0].o, tail[3].o + 1, len(stream) - 5):
        assert store.read_text("trunc", since) == suffix(stream, since)
    text = store.read_text("trunc")
    assert text == head_bytes.decode() + cut_rec.d + tail_bytes.decode()
    assert "".join(store.iter_text("trunc", chunk_bytes=100)) == text
    assert len(list(store.iter_text("trunc", chunk_bytes=100))) > 10


def test_one_huge_append_is_cut_and_bounded(tmp_path: Path) -> None:
    store = LogStore(tmp_path, max_bytes=1024)
    store.append("big", "out", "start\n")
    big = ("0123456789€" * 20_000).encode()
    n = store.append("big", "out", big)
    stream = b"start\n" + big
    assert n == len(stream) == store.size("big")
    records = store.read_records("big")
    k = next(i for i, r in enumerate(records) if r.cut)
    head = "".join(r.d for r in records[:k]).encode()
    tail = "".join(r.d for r in records[k + 1 :]).encode()
    assert stream.startswith(head) and stream.endswith(tail)
    assert len(head) + records[k].cut + len(tail) == len(stream)
    files = list((tmp_path / "bi" / "big").iterdir())
    assert len(files) <= 5 and sum(p.stat().st_size for p in files) < 4 * 1024


def test_recovery_continues_offsets(tmp_path: Path) -> None:
    first = LogStore(tmp_path, max_bytes=2048)
    stream = write_random(first, "rec", 10_000, seed=5)
    first.append("small", "out", "héllo ")
    first.close()
    second = LogStore(tmp_path, max_bytes=2048)
    assert second.size("rec") == len(stream)
    assert second.append("small", "out", "wörld") == len("héllo wörld".encode())
    assert second.read_text("small") == "héllo wörld"
    more = write_random(second, "rec", 10_000, seed=6)
    stream += more
    assert second.size("rec") == len(stream)
    records = second.read_records("rec")
    check_contiguous(records)
    assert records[-1].end == len(stream)
    assert "".join(r.d for r in records if r.o >= len(stream) - 500).encode() in stream
    assert second.read_text("rec", len(stream) - 300) == suffix(stream, len(stream) - 300)


def test_recovery_drops_a_torn_last_line(tmp_path: Path) -> None:
    store = LogStore(tmp_path)
    store.append("torn", "out", "complete\n")
    store.close()
    head = tmp_path / "to" / "torn" / "head.jsonl"
    with open(head, "ab") as f:
        f.write(b'{"o":9,"t":1,"s":"out","d":"half')  # a crash mid-write
    store = LogStore(tmp_path)
    assert store.size("torn") == 9
    assert store.append("torn", "err", "next\n") == 14
    assert store.read_text("torn") == "complete\nnext\n"
    assert head.read_bytes().count(b"\n") == 2


def test_lru_of_handles(tmp_path: Path) -> None:
    store = LogStore(tmp_path, max_open=2)
    expected: dict[str, str] = {}
    for i in range(50):
        run = f"run{i % 5}"
        expected[run] = expected.get(run, "") + f"{i}ü\n"
        store.append(run, "out", f"{i}ü\n")
    for run, text in expected.items():
        assert store.read_text(run) == text and store.size(run) == len(text.encode())


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_lru_bounds_open_handles(tmp_path: Path) -> None:
    def open_under_root() -> int:
        fds = Path("/proc/self/fd")
        targets = []
        for fd in fds.iterdir():
            with contextlib.suppress(OSError):
                targets.append(os.readlink(fd))
        return sum(1 for t in targets if t.startswith(str(tmp_path)))

    store = LogStore(tmp_path, max_open=3)
    for i in range(20):
        store.append(f"run{i}", "out", "x")
    assert open_under_root() == 3
    store.close("run19")
    assert open_under_root() == 2
    store.close()
    assert open_under_root() == 0
    assert store.append("run0", "out", "y") == 2  # reopened after close


def test_delete(tmp_path: Path) -> None:
    store = LogStore(tmp_path, max_bytes=1024)
    write_random(store, "gone", 5000, seed=1)
    store.append("go-keep", "out", "stay")
    store.delete("gone")
    assert not (tmp_path / "go" / "gone").exists()
    assert store.size("gone") == 0 and store.read_records("gone") == []
    assert store.read_text("go-keep") == "stay"
    store.delete("gone")  # absent: no error
    store.delete("never")
    assert store.append("gone", "out", "again") == 5
    assert store.read_text("gone") == "again"


@pytest.mark.parametrize("run_id", ["", "../x", "a/b", "a.b", "x" * 65, "é", "a b", ".."])
def test_bad_run_ids_rejected(tmp_path: Path, run_id: str) -> None:
    store = LogStore(tmp_path)
    with pytest.raises(ValueError, match="run id"):
        store.append(run_id, "out", "x")
    for call in (store.size, store.read_records, store.read_text, store.delete, store.close):
        with pytest.raises(ValueError):
            call(run_id)
    with pytest.raises(ValueError):
        store.iter_text(run_id)
    assert list(tmp_path.iterdir()) == []


def test_bad_stream_and_since_rejected(tmp_path: Path) -> None:
    store = LogStore(tmp_path)
    with pytest.raises(ValueError, match="'stdout'"):
        store.append("r", "stdout", "x")
    with pytest.raises(ValueError, match="'bad'"):
        store.append_many("r", [("out", "ok", None), ("bad", "x", None)])
    assert store.size("r") == 0  # the valid frame before the bad one was not written
    with pytest.raises(ValueError, match="since"):
        store.read_records("r", -1)
    with pytest.raises(ValueError, match="since"):
        store.iter_text("r", -1)
    assert LogStore(tmp_path).append("x" * 64, "out", "ok") == 2


def test_record_json() -> None:
    assert LogRecord(1, 2, "out", "é").to_json() == {"o": 1, "t": 2, "s": "out", "d": "é"}
    cut = LogRecord(5, 2, "sys", "[... 7 bytes of log cut ...]\n", 7)
    assert cut.to_json()["cut"] == 7 and cut.end == 12
    assert LogRecord(1, 2, "out", "é").end == 3
    assert [s.value for s in LogStream] == ["out", "err", "sys"]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    chunks=st.lists(
        st.one_of(st.text(min_size=0, max_size=40), st.binary(max_size=20)), max_size=30
    ),
    sinces=st.lists(st.integers(min_value=0, max_value=2000), max_size=10),
)
def test_any_since_reads_exact_suffix(
    tmp_path: Path, chunks: list[str | bytes], sinces: list[int]
) -> None:
    store = LogStore(tempfile.mkdtemp(dir=tmp_path), max_bytes=1 << 20)  # fresh per example
    stream = b""
    for c in chunks:
        stream += c.decode("utf-8", "replace").encode() if isinstance(c, bytes) else c.encode()
        assert store.append("p", "out", c) == len(stream)
    for since in [0, len(stream), *sinces, *range(0, len(stream), 7)]:
        expected = suffix(stream, since)
        assert store.read_text("p", since) == expected
        records = store.read_records("p", since)
        assert "".join(r.d for r in records) == expected
        if expected:
            assert records[0].o == len(stream) - len(expected.encode())
        check_contiguous(records)


def test_concurrent_reader_sees_whole_ordered_records(tmp_path: Path) -> None:
    store = LogStore(tmp_path, max_bytes=8192)  # small, so segments rotate during the read
    lines = [f"line {i:05d} {'é😀' * (i % 9)}\n" for i in range(4000)]
    stream = "".join(lines).encode()
    errors: list[BaseException] = []
    done = threading.Event()

    def writer() -> None:
        try:
            for i in range(0, len(lines), 3):
                store.append_many("conc", [("out", line, i) for line in lines[i : i + 3]])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            done.set()

    seen = 0
    cursor = 0
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while not done.is_set() or cursor < len(stream):
            records = store.read_records("conc", cursor, max_bytes=2000)
            for rec in records:
                assert rec.o == cursor
                if rec.cut:
                    assert rec.s == "sys"
                else:
                    assert rec.d.encode() == stream[rec.o : rec.end]
                cursor = rec.end
                seen += 1
            back = max(0, cursor - 50)  # a second reader a little behind, whole text
            text = store.read_text("conc", back)
            if "bytes of log cut" not in text:
                assert suffix(stream, back).startswith(text)
    finally:
        thread.join()
    assert not errors
    assert cursor == len(stream) and seen > 100


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    chunks=st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=300), max_size=40),
    max_bytes=st.integers(min_value=64, max_value=512),
    since=st.integers(min_value=0, max_value=12_000),
)
def test_cut_reads_are_head_cut_tail(
    tmp_path: Path, chunks: list[str], max_bytes: int, since: int
) -> None:
    store = LogStore(tempfile.mkdtemp(dir=tmp_path), max_bytes=max_bytes)
    stream = "".join(chunks).encode()
    for c in chunks:
        store.append("c", "err", c)
    records = store.read_records("c", since)
    check_contiguous(records)
    if since >= len(stream):
        assert records == []
        return
    cuts = [r for r in records if r.cut]
    assert len(cuts) <= 1
    if not cuts:
        assert "".join(r.d for r in records) == suffix(stream, since)
        return
    cut = cuts[0]
    k = records.index(cut)
    assert cut.o >= since and cut.end == records[k + 1].o and cut.s == "sys"
    assert "".join(r.d for r in records[:k]) == suffix(stream[: cut.o], since)
    assert "".join(r.d for r in records[k + 1 :]).encode() == stream[cut.end :]
    assert cut.o >= max_bytes // 2 - 3 and len(stream) - cut.end <= max_bytes // 2
