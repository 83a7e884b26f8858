"""Listing, retention, schema and group commit of the SQLite store (SPEC §4, §10)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from jupyter_compute_queue.host.store.base import Held, NotFound, Outcome
from jupyter_compute_queue.host.store.schema import MIGRATIONS
from jupyter_compute_queue.host.store.sqlite import SqliteStore
from jupyter_compute_queue.model.jobs import JobDefinition, job_id
from jupyter_compute_queue.model.runs import OutputRef, Reason, RunState

from .conftest import (
    T0,
    StoreFactory,
    claim,
    complete,
    definition,
    register,
    request,
    submit,
    worker_info,
)


def key(n: int) -> str:
    return f"{n:064x}"


def sql(path: Path, query: str) -> list[tuple[Any, ...]]:
    """A query on a connection of its own: what is on disk, not what the store caches."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(query).fetchall()
    finally:
        conn.close()


# --- listing ----------------------------------------------------------------------------------


async def all_pages(store: SqliteStore, queue: str, limit: int, **kw: Any) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor = None
    while True:
        page = await store.list_runs(queue, cursor=cursor, limit=limit, **kw)
        pages.append([r.run_id for r in page.runs])
        if page.cursor is None:
            return pages
        assert len(pages) < 100, "the cursor never ends"
        cursor = page.cursor


async def test_keyset_pagination_newest_first(store: SqliteStore) -> None:
    results = await store.submit([request(n) for n in range(25)], T0)
    await submit(store, 99, queue="other")
    newest_first = [r.record.run_id for r in reversed(results)]
    pages = await all_pages(store, "q", 10)
    assert [len(p) for p in pages] == [10, 10, 5]
    assert [run_id for page in pages for run_id in page] == newest_first
    for limit in (1, 3, 5, 7, 24, 25, 26, 100):
        flat = [run_id for page in await all_pages(store, "q", limit) for run_id in page]
        assert flat == newest_first, limit


async def test_last_full_page_has_no_cursor(store: SqliteStore) -> None:
    await store.submit([request(n) for n in range(20)], T0)
    pages = await all_pages(store, "q", 10)
    assert [len(p) for p in pages] == [10, 10]


async def test_empty_queue_lists_nothing(store: SqliteStore) -> None:
    page = await store.list_runs("q")
    assert page.runs == [] and page.cursor is None


async def test_pagination_is_stable_while_runs_are_added(store: SqliteStore) -> None:
    first = await store.submit([request(n) for n in range(15)], T0)
    page1 = await store.list_runs("q", limit=10)
    await store.submit([request(n) for n in range(100, 110)], T0 + 1)  # newer runs arrive
    page2 = await store.list_runs("q", limit=10, cursor=page1.cursor)
    seen = [r.run_id for r in page1.runs + page2.runs]
    assert seen == [r.record.run_id for r in reversed(first)]
    assert page2.cursor is None


@pytest.mark.parametrize("cursor", ["not-a-cursor", "0", "-5", str(2**63), "9" * 40])
async def test_bad_cursor_is_a_value_error(store: SqliteStore, cursor: str) -> None:
    # Found by fuzzing: a cursor past SQLite's integers was an OverflowError (a 500).
    with pytest.raises(ValueError, match="cursor"):
        await store.list_runs("q", cursor=cursor)


async def test_list_filters_by_state_and_namespace(store: SqliteStore) -> None:
    queued = await submit(store, 1, now=T0)
    running = await submit(store, 2, namespace="ns", now=T0 + 1)
    await submit(store, 3, namespace="other", now=T0 + 2)
    await store.cancel("q", queued.record.job_id, None, T0 + 3)  # finished
    worker = await register(store)
    a = await claim(store, worker)  # the oldest queued one is now run 2
    assert a is not None and a.record.run_id == running.record.run_id

    async def states(**kw: Any) -> list[tuple[str, RunState]]:
        page = await store.list_runs("q", **kw)
        return [(r.namespaces[0], r.state) for r in page.runs]

    assert await states() == [
        ("other", RunState.QUEUED),
        ("ns", RunState.RUNNING),
        ("_", RunState.FINISHED),
    ]
    assert await states(states=[RunState.QUEUED]) == [("other", RunState.QUEUED)]
    assert await states(states=[RunState.RUNNING, RunState.FINISHED]) == [
        ("ns", RunState.RUNNING),
        ("_", RunState.FINISHED),
    ]
    assert await states(namespace="ns") == [("ns", RunState.RUNNING)]
    assert await states(namespace="ns", states=[RunState.QUEUED]) == []
    assert await states(namespace="nobody") == []


async def test_namespace_filter_paginates(store: SqliteStore) -> None:
    results = await store.submit(
        [request(n, namespace="_" if n % 2 == 0 else f"cell:{n}") for n in range(30)], T0
    )
    held_by_default = [r.record.run_id for r in reversed(results) if r.record.namespaces == ["_"]]
    assert len(held_by_default) == 15
    pages = await all_pages(store, "q", 4, namespace="_")
    assert [len(p) for p in pages] == [4, 4, 4, 3]
    assert [run_id for page in pages for run_id in page] == held_by_default
    assert await all_pages(store, "q", 4, namespace="cell:7") == [[results[7].record.run_id]]


async def test_counts_by_state_and_oldest_queued(store: SqliteStore) -> None:
    empty = await store.counts("q")
    assert empty.by_state == {s: 0 for s in RunState}
    assert empty.oldest_queued_at is None

    await complete(store, 0, now=T0)  # finished
    await submit(store, 1, now=T0 + 10)  # will be running
    await submit(store, 2, now=T0 + 20)
    await submit(store, 3, now=T0 + 30)
    await submit(store, 4, queue="other", now=T0 + 5)
    worker = await register(store, "runner", now=T0 + 40)
    assert await claim(store, worker, T0 + 40) is not None
    counts = await store.counts("q")
    assert counts.by_state == {
        RunState.QUEUED: 2,
        RunState.RUNNING: 1,
        RunState.FINISHED: 1,
    }
    assert counts.oldest_queued_at == T0 + 20
    # A run given back keeps its place and its queued time.
    await store.give_back("runner", None)
    assert (await store.counts("q")).oldest_queued_at == T0 + 10


# --- retention --------------------------------------------------------------------------------


def keyed(n: int) -> JobDefinition:
    """Job ``n`` with one ``key`` input, the blob ``key(n)``."""
    return definition(n, inputs={"data.bin": {"type": "key", "value": key(n)}})


async def finish_with_output(store: SqliteStore, n: int, now: float) -> str:
    """A Success run of ``keyed(n)`` with one output, the blob ``key(100 + n)``; its run id."""
    queued = await submit(store, keyed(n), now=now)
    worker = await register(store, "finisher", now=now)
    a = await claim(store, worker, now)
    assert a is not None and a.record.run_id == queued.record.run_id
    outcome = Outcome(Reason.SUCCESS, 0, outputs={"out.bin": OutputRef(key=key(100 + n), size=1)})
    await store.finish(a.record.run_id, a.fence, "finisher", outcome, now)
    return a.record.run_id


async def test_sweep_deletes_old_finished_runs_in_batches(store: SqliteStore) -> None:
    old = [await finish_with_output(store, n, T0) for n in range(5)]
    touched = await finish_with_output(store, 10, T0)
    hit = await finish_with_output(store, 11, T0)
    running = await submit(store, keyed(13), now=T0)
    queued = await submit(store, keyed(12), now=T0)
    worker = await register(store, "holder", now=T0)
    a = await claim(store, worker, T0)
    assert a is not None and a.record.run_id == running.record.run_id
    await store.touch([touched], T0 + 100)
    assert (await submit(store, keyed(11), now=T0 + 100)).outcome == "cached"  # an access too

    inputs = [key(n) for n in (0, 1, 2, 3, 4, 10, 11, 12, 13)]
    outputs = [key(100 + n) for n in (0, 1, 2, 3, 4, 10, 11)]
    assert await store.referenced_blobs([*inputs, *outputs, key(999)]) == {*inputs, *outputs}

    swept: list[str] = []
    jobs = calls = 0
    while True:
        result = await store.sweep(T0 + 50, batch=2)
        calls += 1
        assert len(result.run_ids) <= 2 and result.jobs <= 2
        swept += result.run_ids
        jobs += result.jobs
        if not result.run_ids and not result.jobs:
            break
        assert calls < 20
    assert calls >= 4  # five runs in batches of two, then a call that finds nothing
    assert sorted(swept) == sorted(old)
    assert jobs == 5

    for run_id in old:
        assert await store.get_run(run_id) is None
    for n in range(5):
        assert await store.get_definition(job_id(keyed(n))) is None
    for run_id in (touched, hit, queued.record.run_id, running.record.run_id):
        assert await store.get_run(run_id) is not None
    for n in (10, 11, 12, 13):
        assert await store.get_definition(job_id(keyed(n))) == keyed(n).wire()

    kept = {key(n) for n in (10, 11, 12, 13)} | {key(110), key(111)}
    assert await store.referenced_blobs([*inputs, *outputs]) == kept
    # A swept job is a new job again, and its input is referenced again.
    assert (await submit(store, keyed(0), now=T0 + 200)).outcome == "new"
    assert await store.referenced_blobs([key(0), key(100)]) == {key(0)}


async def test_sweep_keeps_a_job_while_one_of_its_runs_is_kept(store: SqliteStore) -> None:
    defn = keyed(1)
    old = await complete(store, defn, queue="a", now=T0)
    new = await complete(store, defn, queue="b", now=T0 + 100)
    result = await store.sweep(T0 + 50, batch=10)
    assert result.run_ids == [old.run_id]
    assert result.jobs == 0
    assert await store.get_run(new.run_id) is not None
    assert await store.get_definition(new.job_id) is not None
    assert await store.referenced_blobs([key(1)]) == {key(1)}


async def test_sweep_boundary_and_nothing_to_do(store: SqliteStore) -> None:
    done = await complete(store, 1, now=T0)
    result = await store.sweep(T0, batch=10)  # accessed exactly at the cutoff: kept
    assert result.run_ids == [] and result.jobs == 0
    assert await store.get_run(done.run_id) is not None
    assert (await store.sweep(T0 + 1, batch=10)).run_ids == [done.run_id]


async def test_sweep_forgets_workers_long_gone(store: SqliteStore) -> None:
    await register(store, "gone", now=T0)
    await store.expire_leases(T0 + 100, 3)
    await register(store, "live", now=T0 + 90)
    await store.heartbeat("live", T0 + 200, 30)
    await store.sweep(T0 + 150, batch=10)
    assert [w["id"] for w in await store.workers()] == ["live"]


# --- schema -----------------------------------------------------------------------------------


async def test_reopening_keeps_everything(open_store: StoreFactory, tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    first = await open_store(path)
    done = await complete(first, 1, now=T0)
    queued = await submit(first, 2, namespace="cell:x", now=T0 + 1)
    worker = await register(first, "w", now=T0 + 1)
    await first.close()
    assert sql(path, "PRAGMA user_version") == [(len(MIGRATIONS),)]

    second = await open_store(path)
    assert sql(path, "PRAGMA user_version") == [(len(MIGRATIONS),)]
    assert sql(path, "PRAGMA journal_mode") == [("wal",)]
    assert await second.get_run(done.run_id) == done
    assert await second.get_run(queued.record.run_id) == queued.record
    assert (await submit(second, 1, now=T0 + 2)).outcome == "cached"
    assert (await submit(second, 2, now=T0 + 2)).outcome == "joined"
    a = await claim(second, worker, T0 + 2)
    assert a is not None and a.record.run_id == queued.record.run_id
    assert await second.heartbeat("w", T0 + 3, 30) == [Held(a.record.run_id, 1)]


async def test_writer_is_wal_with_full_sync(store: SqliteStore) -> None:
    """SPEC §10: WAL and synchronous=FULL, so a commit is on disk when a write is answered."""

    def pragmas(c: sqlite3.Connection) -> tuple[str, int]:
        return c.execute("PRAGMA journal_mode").fetchone()[0], c.execute(
            "PRAGMA synchronous"
        ).fetchone()[0]

    assert await store._engine.write(pragmas) == ("wal", 2)  # 2 = FULL


async def test_newer_schema_is_refused(open_store: StoreFactory, tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    store = await open_store(path)
    await submit(store, 1)
    await store.close()
    newer = len(MIGRATIONS) + 1
    sql(path, f"PRAGMA user_version = {newer}")
    with pytest.raises(RuntimeError, match=r"newer than this release.*upgrade"):
        await open_store(path)
    assert sql(path, "PRAGMA user_version") == [(newer,)]  # left as it was
    assert sql(path, "SELECT count(*) FROM runs") == [(1,)]


# --- group commit -----------------------------------------------------------------------------


def spy_groups(store: SqliteStore) -> list[int]:
    """Record the size of every group transaction the store's engine runs."""
    sizes: list[int] = []
    engine = store._engine
    run_group = engine._run_group

    def recording(fns: list[Callable[[sqlite3.Connection], Any]]) -> Any:
        sizes.append(len(fns))
        return run_group(fns)

    engine._run_group = recording  # type: ignore[method-assign]
    return sizes


async def test_concurrent_writes_all_commit(store: SqliteStore) -> None:
    sizes = spy_groups(store)
    results = await asyncio.gather(*(submit(store, n, now=T0 + n) for n in range(200)))
    assert sum(sizes) == 200
    assert len(sizes) < 200 and max(sizes) > 1  # they were grouped
    assert all(r.outcome == "new" for r in results)
    assert len({r.record.run_id for r in results}) == 200
    on_disk = sql(store.path, "SELECT run_id FROM runs WHERE state = 0")
    assert {row[0] for row in on_disk} == {r.record.run_id for r in results}


async def test_one_failing_write_does_not_undo_its_group(store: SqliteStore) -> None:
    sizes = spy_groups(store)
    before, failed, after = await asyncio.gather(
        submit(store, 1),
        claim(store, worker_info("stranger")),
        submit(store, 2),
        return_exceptions=True,
    )
    assert sizes == [3]
    assert isinstance(failed, NotFound)
    for result in (before, after):
        assert not isinstance(result, BaseException)
        assert result.outcome == "new"
        assert await store.get_run(result.record.run_id) is not None
    assert len(sql(store.path, "SELECT * FROM runs")) == 2


async def test_a_failing_write_leaves_no_partial_change(store: SqliteStore) -> None:
    def half_done(c: sqlite3.Connection) -> None:
        c.execute(
            "INSERT INTO jobs (job_id, definition, created_at, accessed_at) "
            "VALUES ('half', '{}', 0, 0)"
        )
        raise ValueError("changed my mind")

    results = await asyncio.gather(
        submit(store, 1), store._engine.write(half_done), submit(store, 2), return_exceptions=True
    )
    assert isinstance(results[1], ValueError)
    assert await store.get_definition("half") is None
    assert len(sql(store.path, "SELECT * FROM jobs")) == 2


async def test_close_finishes_pending_writes(open_store: StoreFactory, tmp_path: Path) -> None:
    store = await open_store()
    tasks = [asyncio.ensure_future(submit(store, n)) for n in range(20)]
    await asyncio.sleep(0)  # let them queue their writes
    await store.close()
    results = [t.result() for t in tasks]
    assert len(sql(tmp_path / "state.sqlite", "SELECT * FROM runs")) == 20
    assert all(r.outcome == "new" for r in results)
