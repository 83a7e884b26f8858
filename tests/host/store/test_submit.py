"""Submission, joining, caching, namespaces and cancel (SPEC §3) on the real SQLite store."""

from __future__ import annotations

import pytest

from jupyter_compute_queue.host.store.base import NotFound
from jupyter_compute_queue.host.store.sqlite import SqliteStore
from jupyter_compute_queue.model.runs import Reason, RunState

from .conftest import T0, claim, complete, definition, register, request, submit


def _jid(n: int) -> str:
    return request(n).job_id


# --- submit -----------------------------------------------------------------------------------


async def test_new_run_is_queued_with_default_holder(store: SqliteStore) -> None:
    result = await submit(store, 1)
    record = result.record
    assert result.outcome == "new"
    assert result.released == []
    assert record.state is RunState.QUEUED
    assert record.namespaces == ["_"]
    assert record.queue == "q"
    assert record.cached is False
    assert record.attempt == 0
    assert record.queued_at.timestamp() == T0
    assert await store.get_run(record.run_id) == record
    assert await store.get_definition(record.job_id) == definition(1).wire()


async def test_same_job_same_queue_joins(store: SqliteStore) -> None:
    first = await submit(store, 1)
    again = await submit(store, 1, namespace="cell:a", now=T0 + 5)
    assert again.outcome == "joined"
    assert again.record.run_id == first.record.run_id
    assert again.record.namespaces == ["_", "cell:a"]
    # The default holder joining once more does not add a duplicate holder.
    third = await submit(store, 1, now=T0 + 6)
    assert third.outcome == "joined"
    assert third.record.namespaces == ["_", "cell:a"]
    assert len(await store.job_runs(first.record.job_id)) == 1


async def test_rerun_joins_an_unfinished_run(store: SqliteStore) -> None:
    first = await submit(store, 1)
    rerun = await submit(store, 1, namespace="ns", rerun=True)
    assert rerun.outcome == "joined"
    assert rerun.record.run_id == first.record.run_id
    assert len(await store.job_runs(first.record.job_id)) == 1


async def test_rerun_joins_a_running_run(store: SqliteStore) -> None:
    first = await submit(store, 1)
    worker = await register(store)
    assert await claim(store, worker) is not None
    rerun = await submit(store, 1, rerun=True)
    assert rerun.outcome == "joined"
    assert rerun.record.run_id == first.record.run_id
    assert rerun.record.state is RunState.RUNNING


async def test_same_job_in_another_queue_is_another_run(store: SqliteStore) -> None:
    a = await submit(store, 1, queue="a")
    b = await submit(store, 1, queue="b")
    assert b.outcome == "new"
    assert a.record.job_id == b.record.job_id
    assert a.record.run_id != b.record.run_id
    assert [r.queue for r in await store.job_runs(a.record.job_id)] == ["b", "a"]
    assert [r.queue for r in await store.job_runs(a.record.job_id, queues={"a"})] == ["a"]


async def test_batch_of_requests_in_one_call(store: SqliteStore) -> None:
    results = await store.submit(
        [
            request(1),
            request(2, queue="other"),
            request(1, namespace="ns"),  # joins the first one of this same batch
            request(3, namespace="ns2"),
        ],
        T0,
    )
    assert [r.outcome for r in results] == ["new", "new", "joined", "new"]
    assert results[2].record.run_id == results[0].record.run_id
    assert results[2].record.namespaces == ["_", "ns"]
    assert results[1].record.queue == "other"
    assert len({r.record.run_id for r in results}) == 3
    for result in results:
        stored = await store.get_run(result.record.run_id)
        assert stored is not None and stored.state is RunState.QUEUED
    assert (await store.counts("q")).by_state[RunState.QUEUED] == 2


async def test_empty_batch(store: SqliteStore) -> None:
    assert await store.submit([], T0) == []


# --- cache ------------------------------------------------------------------------------------


async def test_success_is_cached_in_the_same_queue(store: SqliteStore) -> None:
    done = await complete(store, 1, now=T0 + 10)
    hit = await submit(store, 1, now=T0 + 20)
    assert hit.outcome == "cached"
    assert hit.record.cached is True
    assert hit.record.run_id == done.run_id
    assert hit.record.state is RunState.FINISHED
    assert hit.record.reason is Reason.SUCCESS
    assert len(await store.job_runs(done.job_id)) == 1
    # Being a cached answer is a property of the answer, not of the stored run.
    stored = await store.get_run(done.run_id)
    assert stored is not None and stored.cached is False


async def test_latest_success_answers(store: SqliteStore) -> None:
    await complete(store, 1, now=T0)
    second = await complete(store, 1, now=T0 + 10, rerun=True)
    hit = await submit(store, 1, now=T0 + 20)
    assert hit.outcome == "cached"
    assert hit.record.run_id == second.run_id


async def test_cache_is_per_queue_by_default(store: SqliteStore) -> None:
    done = await complete(store, 1, queue="a")
    other = await submit(store, 1, queue="b")
    assert other.outcome == "new"
    assert other.record.run_id != done.run_id
    assert other.record.state is RunState.QUEUED


async def test_cache_any_queue_hits_from_another_queue(store: SqliteStore) -> None:
    done = await complete(store, 1, queue="a")
    hit = await submit(store, 1, queue="b", cache_any_queue=True)
    assert hit.outcome == "cached"
    assert hit.record.run_id == done.run_id
    assert hit.record.cached is True


async def test_cache_since_after_the_finish_is_not_a_hit(store: SqliteStore) -> None:
    await complete(store, 1, now=T0 + 100)
    still = await submit(store, 1, now=T0 + 200, cache_since=T0 + 100)
    assert still.outcome == "cached"
    await store.forget("q", still.record.job_id)
    await complete(store, 2, now=T0 + 100)
    miss = await submit(store, 2, now=T0 + 200, cache_since=T0 + 101)
    assert miss.outcome == "new"
    assert miss.record.state is RunState.QUEUED


async def test_failed_run_is_not_cached(store: SqliteStore) -> None:
    failed = await complete(store, 1, reason=Reason.FAILED)
    again = await submit(store, 1)
    assert again.outcome == "new"
    assert again.record.run_id != failed.run_id


async def test_forget_stops_the_cache_hit(store: SqliteStore) -> None:
    done = await complete(store, 1)
    assert await store.forget("q", done.job_id) == 1
    again = await submit(store, 1)
    assert again.outcome == "new"
    assert again.record.run_id != done.run_id
    assert await store.forget("q", done.job_id) == 0
    # The run itself is still there.
    assert (await store.get_run(done.run_id)) is not None


async def test_forget_is_per_queue(store: SqliteStore) -> None:
    await complete(store, 1, queue="a")
    await complete(store, 1, queue="b")
    assert await store.forget("a", _jid(1)) == 1
    assert (await submit(store, 1, queue="a")).outcome == "new"
    assert (await submit(store, 1, queue="b")).outcome == "cached"


async def test_rerun_queues_a_new_run_despite_the_cache(store: SqliteStore) -> None:
    done = await complete(store, 1)
    rerun = await submit(store, 1, rerun=True)
    assert rerun.outcome == "new"
    assert rerun.record.run_id != done.run_id
    assert rerun.record.state is RunState.QUEUED


@pytest.mark.parametrize("reason", [Reason.FAILED, Reason.ERROR, Reason.TIMED_OUT])
async def test_failed_rerun_removes_the_cached_result(store: SqliteStore, reason: Reason) -> None:
    await complete(store, 1, now=T0)
    await complete(store, 1, now=T0 + 10, rerun=True, reason=reason)
    after = await submit(store, 1, now=T0 + 20)
    assert after.outcome == "new"
    assert after.record.state is RunState.QUEUED


async def test_cancelled_rerun_keeps_the_cached_result(store: SqliteStore) -> None:
    done = await complete(store, 1, now=T0)
    rerun = await submit(store, 1, now=T0 + 10, rerun=True)
    assert rerun.outcome == "new"
    worker = await register(store, "w", now=T0 + 10)
    assert await claim(store, worker, T0 + 10) is not None
    cancelled = await store.cancel("q", done.job_id, None, T0 + 11)
    assert cancelled.record.reason is Reason.CANCELLED
    after = await submit(store, 1, now=T0 + 20)
    assert after.outcome == "cached"
    assert after.record.run_id == done.run_id


async def test_failure_of_a_plain_run_keeps_the_cached_result(store: SqliteStore) -> None:
    done = await complete(store, 1, now=T0)
    # A submission that may not see that result (cache_since) queues a plain, non-rerun run.
    await complete(store, 1, now=T0 + 10, cache_since=T0 + 5, reason=Reason.FAILED)
    after = await submit(store, 1, now=T0 + 20)
    assert after.outcome == "cached"
    assert after.record.run_id == done.run_id


async def test_rerun_joining_a_plain_run_makes_its_failure_remove_the_cache(
    store: SqliteStore,
) -> None:
    await complete(store, 1, now=T0)
    plain = await submit(store, 1, now=T0 + 10, cache_since=T0 + 5)
    assert plain.outcome == "new"
    joined = await submit(store, 1, now=T0 + 11, rerun=True)
    assert joined.outcome == "joined"
    await complete(store, 1, now=T0 + 12, reason=Reason.FAILED)  # joins, claims, fails
    after = await submit(store, 1, now=T0 + 20)
    assert after.outcome == "new"


# --- namespaces -------------------------------------------------------------------------------


async def test_namespace_submitting_another_job_replaces_its_queued_run(
    store: SqliteStore,
) -> None:
    a = await submit(store, 1, namespace="cell:x")
    b = await submit(store, 2, namespace="cell:x", now=T0 + 1)
    assert b.outcome == "new"
    [released] = b.released
    assert released.changed
    assert released.record.run_id == a.record.run_id
    assert released.record.state is RunState.FINISHED
    assert released.record.reason is Reason.REPLACED
    assert released.record.namespaces == []
    assert released.stop_on_worker is None  # it was only queued
    stored = await store.get_run(a.record.run_id)
    assert stored is not None and stored.reason is Reason.REPLACED


async def test_replacing_a_running_run_stops_it_on_its_worker(store: SqliteStore) -> None:
    a = await submit(store, 1, namespace="cell:x")
    worker = await register(store, "w7")
    assignment = await claim(store, worker)
    assert assignment is not None and assignment.record.run_id == a.record.run_id
    b = await submit(store, 2, namespace="cell:x", now=T0 + 1)
    [released] = b.released
    assert released.record.reason is Reason.REPLACED
    assert released.stop_on_worker == "w7"
    # The worker no longer holds it: its next heartbeat tells it so.
    assert await store.heartbeat("w7", T0 + 2, 30) == []


async def test_release_with_another_holder_keeps_the_run(store: SqliteStore) -> None:
    a = await submit(store, 1, namespace="cell:x")
    await submit(store, 1, namespace="cell:y")
    worker = await register(store, "w7")
    assert await claim(store, worker) is not None
    b = await submit(store, 2, namespace="cell:x", now=T0 + 1)
    [released] = b.released
    assert released.changed
    assert released.stop_on_worker is None
    assert released.record.run_id == a.record.run_id
    assert released.record.state is RunState.RUNNING
    assert released.record.namespaces == ["cell:y"]


async def test_release_happens_across_queues(store: SqliteStore) -> None:
    a = await submit(store, 1, queue="gpu", namespace="cell:x")
    b = await submit(store, 2, queue="cpu", namespace="cell:x")
    assert [c.record.run_id for c in b.released] == [a.record.run_id]
    stored = await store.get_run(a.record.run_id)
    assert stored is not None and stored.reason is Reason.REPLACED


async def test_same_job_in_another_queue_releases_the_first(store: SqliteStore) -> None:
    a = await submit(store, 1, queue="a", namespace="cell:x")
    b = await submit(store, 1, queue="b", namespace="cell:x")
    assert b.outcome == "new"
    assert [c.record.run_id for c in b.released] == [a.record.run_id]


async def test_cache_hit_also_releases(store: SqliteStore) -> None:
    done = await complete(store, 1)
    a = await submit(store, 2, namespace="cell:x")
    hit = await submit(store, 1, namespace="cell:x", now=T0 + 1)
    assert hit.outcome == "cached"
    assert hit.record.run_id == done.run_id
    assert [c.record.run_id for c in hit.released] == [a.record.run_id]
    assert hit.released[0].record.reason is Reason.REPLACED


async def test_joining_the_same_run_does_not_release_it(store: SqliteStore) -> None:
    a = await submit(store, 1, namespace="cell:x")
    again = await submit(store, 1, namespace="cell:x", now=T0 + 1)
    assert again.outcome == "joined"
    assert again.released == []
    assert again.record.run_id == a.record.run_id
    assert again.record.state is RunState.QUEUED
    assert again.record.namespaces == ["cell:x"]


async def test_default_namespace_never_releases(store: SqliteStore) -> None:
    runs = [await submit(store, n) for n in range(3)]
    assert all(r.released == [] and r.outcome == "new" for r in runs)
    for r in runs:
        stored = await store.get_run(r.record.run_id)
        assert stored is not None and stored.state is RunState.QUEUED


async def test_finished_runs_are_not_released(store: SqliteStore) -> None:
    await complete(store, 1, namespace="cell:x")
    b = await submit(store, 2, namespace="cell:x")
    assert b.released == []


# --- cancel -----------------------------------------------------------------------------------


async def test_cancel_with_namespace_drops_one_holder_then_cancels(store: SqliteStore) -> None:
    a = await submit(store, 1, namespace="cell:x")
    await submit(store, 1, namespace="cell:y")
    job = a.record.job_id
    first = await store.cancel("q", job, "cell:x", T0 + 1)
    assert first.changed
    assert first.record.state is RunState.QUEUED
    assert first.record.namespaces == ["cell:y"]
    # A namespace that does not hold the run changes nothing.
    other = await store.cancel("q", job, "cell:z", T0 + 2)
    assert not other.changed
    assert other.record.state is RunState.QUEUED
    last = await store.cancel("q", job, "cell:y", T0 + 3)
    assert last.changed
    assert last.record.state is RunState.FINISHED
    assert last.record.reason is Reason.CANCELLED
    assert last.record.finished_at is not None and last.record.finished_at.timestamp() == T0 + 3


async def test_cancel_without_namespace_cancels(store: SqliteStore) -> None:
    a = await submit(store, 1, namespace="cell:x")
    await submit(store, 1, namespace="cell:y")
    worker = await register(store, "w3")
    assert await claim(store, worker) is not None
    change = await store.cancel("q", a.record.job_id, None, T0 + 1)
    assert change.changed
    assert change.record.reason is Reason.CANCELLED
    assert change.stop_on_worker == "w3"
    assert await store.heartbeat("w3", T0 + 2, 30) == []


async def test_cancel_of_a_finished_run_changes_nothing(store: SqliteStore) -> None:
    done = await complete(store, 1)
    change = await store.cancel("q", done.job_id, None, T0 + 1)
    assert not change.changed
    assert change.record.run_id == done.run_id
    assert change.record.reason is Reason.SUCCESS
    assert change.stop_on_worker is None


async def test_cancel_of_an_unknown_job(store: SqliteStore) -> None:
    with pytest.raises(NotFound):
        await store.cancel("q", "0" * 64, None, T0)
    await submit(store, 1, queue="a")
    with pytest.raises(NotFound):  # the job exists, but not in this queue
        await store.cancel("b", _jid(1), None, T0)
