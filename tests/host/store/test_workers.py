"""Claims, leases and fencing (SPEC §4, §5) on the real SQLite store."""

from __future__ import annotations

import asyncio

import pytest

from jupyter_compute_queue.host.store.base import Conflict, Held, NotFound, Outcome, WorkerInfo
from jupyter_compute_queue.host.store.sqlite import SqliteStore
from jupyter_compute_queue.model.capacity import Capacity
from jupyter_compute_queue.model.runs import OutputRef, Phase, Reason, RunState

from .conftest import (
    LEASE,
    MAX_LOST,
    T0,
    claim,
    definition,
    finish,
    register,
    request,
    submit,
    worker_info,
)

GiB = 1024**3


async def claimed(store: SqliteStore, worker: WorkerInfo, now: float = T0, **kw: object) -> str:
    """The run id of a claim that must succeed."""
    assignment = await claim(store, worker, now, **kw)  # type: ignore[arg-type]
    assert assignment is not None
    return assignment.record.run_id


# --- claims -----------------------------------------------------------------------------------


async def test_claim_gives_the_oldest_first(store: SqliteStore) -> None:
    ids = [(await submit(store, n, now=T0 + n)).record.run_id for n in range(4)]
    worker = await register(store, now=T0 + 10)
    got = [await claimed(store, worker, T0 + 10) for _ in range(4)]
    assert got == ids
    assert await claim(store, worker, T0 + 10) is None


async def test_claim_marks_the_run_running_and_sends_the_definition(store: SqliteStore) -> None:
    defn = definition(1, requirements={"cpus": 2, "memory": "1g", "gpus": 1})
    queued = await submit(store, defn)
    worker = await register(store, cpus=8, memory=8 * GiB, gpus=2, now=T0 + 1)
    assignment = await claim(store, worker, T0 + 2)
    assert assignment is not None
    record = assignment.record
    assert record.run_id == queued.record.run_id
    assert record.state is RunState.RUNNING
    assert record.worker is not None and record.worker.id == "w1"
    assert record.worker.version == "1.0"
    assert record.started_at is not None and record.started_at.timestamp() == T0 + 2
    assert record.attempt == 1
    assert assignment.fence == 1
    assert assignment.definition == defn.wire()
    assert assignment.needs == Capacity(2, GiB, 1)
    assert await store.get_run(record.run_id) == record
    assert await store.heartbeat("w1", T0 + 3, LEASE) == [Held(record.run_id, 1)]


async def test_claim_without_registration_is_not_found(store: SqliteStore) -> None:
    await submit(store, 1)
    with pytest.raises(NotFound):
        await claim(store, worker_info("stranger"))
    stored = (await store.list_runs("q")).runs[0]
    assert stored.state is RunState.QUEUED


async def test_claim_after_the_lease_passed_is_not_found(store: SqliteStore) -> None:
    await submit(store, 1)
    worker = await register(store)
    with pytest.raises(NotFound):
        await claim(store, worker, T0 + LEASE + 1)


async def test_default_cpus_is_one(store: SqliteStore) -> None:
    queued = await submit(store, 1)  # names no cpus
    worker = await register(store)
    assert await claim(store, worker, free=Capacity(0.5)) is None
    assignment = await claim(store, worker, free=Capacity(1))
    assert assignment is not None and assignment.record.run_id == queued.record.run_id
    assert assignment.needs.cpus == 1


async def test_cpus_must_fit(store: SqliteStore) -> None:
    await submit(store, definition(1, requirements={"cpus": 2.5}))
    worker = await register(store)
    assert await claim(store, worker, free=Capacity(2)) is None
    assert await claim(store, worker, free=Capacity(2.5)) is not None


async def test_memory_must_fit(store: SqliteStore) -> None:
    await submit(store, definition(1, requirements={"memory": "2g"}))
    worker = await register(store, memory=4 * GiB)
    assert await claim(store, worker, free=Capacity(4, GiB)) is None
    assert await claim(store, worker, free=Capacity(4, 2 * GiB)) is not None


async def test_unaccounted_memory_fits_anything(store: SqliteStore) -> None:
    await submit(store, definition(1, requirements={"memory": "512g"}))
    worker = await register(store)
    assert await claim(store, worker, free=Capacity(4, None)) is not None


async def test_gpus_must_fit(store: SqliteStore) -> None:
    await submit(store, definition(1, requirements={"gpus": 2}))
    worker = await register(store, gpus=2)
    assert await claim(store, worker, free=Capacity(4, None, 1)) is None
    assert await claim(store, worker, free=Capacity(4, None, 2)) is not None


async def test_a_run_that_does_not_fit_is_skipped_for_a_younger_one(store: SqliteStore) -> None:
    await submit(store, definition(1, requirements={"cpus": 8}), now=T0)
    small = await submit(store, 2, now=T0 + 1)
    worker = await register(store, cpus=4)
    assert await claimed(store, worker) == small.record.run_id
    assert await claim(store, worker) is None


async def test_job_tags_must_be_a_subset_of_the_workers(store: SqliteStore) -> None:
    tagged = await submit(store, definition(1, tags=["linux", "gpu"]))
    plain = await submit(store, 2, now=T0 + 1)
    narrow = await register(store, "narrow", tags={"gpu"})
    assert await claimed(store, narrow) == plain.record.run_id
    assert await claim(store, narrow) is None
    wide = await register(store, "wide", tags={"gpu", "linux", "x86"})
    assert await claimed(store, wide) == tagged.record.run_id


async def test_tag_filter_looks_past_many_runs_that_do_not_fit(store: SqliteStore) -> None:
    await store.submit([request(definition(n, tags=["special"])) for n in range(150)], T0)
    plain = await submit(store, 1000, now=T0 + 1)
    worker = await register(store)
    assert await claimed(store, worker) == plain.record.run_id
    assert await claim(store, worker) is None


async def test_max_duration_must_be_covered_by_the_worker(store: SqliteStore) -> None:
    long = await submit(store, definition(1, maxDuration=7200))
    seed = await submit(store, definition(2, requirements={"maxDuration": "2h"}), now=T0 + 1)
    short = await submit(store, definition(3, maxDuration="1h"), now=T0 + 2)
    unlimited = await submit(store, 4, now=T0 + 3)
    hourly = await register(store, "hourly", max_duration=3600)
    assert await claimed(store, hourly) == short.record.run_id
    assert await claimed(store, hourly) == unlimited.record.run_id
    assert await claim(store, hourly) is None
    daily = await register(store, "daily", max_duration=86400)
    assert await claimed(store, daily) == long.record.run_id
    assert await claimed(store, daily) == seed.record.run_id


async def test_claim_takes_the_oldest_across_the_workers_queues(store: SqliteStore) -> None:
    b1 = await submit(store, 1, queue="b", now=T0)
    a1 = await submit(store, 2, queue="a", now=T0 + 1)
    b2 = await submit(store, 3, queue="b", now=T0 + 2)
    await submit(store, 4, queue="c", now=T0 - 10)  # older, but not served by this worker
    worker = await register(store, queues=("a", "b"))
    got = [await claimed(store, worker) for _ in range(3)]
    assert got == [b1.record.run_id, a1.record.run_id, b2.record.run_id]
    assert await claim(store, worker) is None


async def test_many_concurrent_claimers_get_each_run_exactly_once(store: SqliteStore) -> None:
    runs = 1000
    results = await store.submit([request(n) for n in range(runs)], T0)
    submitted = {r.record.run_id for r in results}
    assert len(submitted) == runs
    workers = [await register(store, f"w{i}", cpus=1e6) for i in range(10)]
    taken: dict[str, list[str]] = {w.worker_id: [] for w in workers}

    async def claimer(worker: WorkerInfo) -> None:
        while (assignment := await claim(store, worker)) is not None:
            assert assignment.fence == 1
            taken[worker.worker_id].append(assignment.record.run_id)

    await asyncio.gather(*(claimer(w) for w in workers))
    everything = [run_id for ids in taken.values() for run_id in ids]
    assert len(everything) == runs
    assert set(everything) == submitted
    assert all(taken.values())  # the claims really interleaved
    for worker in workers:
        held = await store.heartbeat(worker.worker_id, T0 + 1, LEASE)
        assert sorted(h.run_id for h in held) == sorted(taken[worker.worker_id])
    counts = await store.counts("q")
    assert counts.by_state[RunState.RUNNING] == runs
    assert counts.by_state[RunState.QUEUED] == 0


# --- leases and fencing -----------------------------------------------------------------------


async def test_expired_lease_requeues_and_fences_the_old_worker(store: SqliteStore) -> None:
    queued = await submit(store, 1)
    run_id = queued.record.run_id
    first = await register(store, "first")
    a1 = await claim(store, first)
    assert a1 is not None and a1.fence == 1

    assert await store.expire_leases(T0 + LEASE - 1, MAX_LOST) == []  # not yet
    later = T0 + LEASE + 1
    [lost] = await store.expire_leases(later, MAX_LOST)
    assert lost.run_id == run_id
    assert lost.state is RunState.QUEUED
    assert lost.lost_count == 1
    assert lost.worker is None
    assert await store.expire_leases(later + 1, MAX_LOST) == []  # counted once

    second = await register(store, "second", now=later)
    a2 = await claim(store, second, later)
    assert a2 is not None and a2.record.run_id == run_id
    assert a2.fence == 2
    assert a2.record.attempt == 2

    with pytest.raises(Conflict):
        await finish(store, a1, first, now=later + 1)
    with pytest.raises(Conflict):  # the current fence, but not the worker holding it
        await store.finish(run_id, 2, "first", Outcome(Reason.SUCCESS), later + 1)
    with pytest.raises(Conflict):
        await store.set_phase(run_id, 1, "first", Phase.RUNNING, None)

    accepted = await finish(store, a2, second, now=later + 2)
    assert accepted.changed
    assert accepted.record.reason is Reason.SUCCESS
    assert accepted.record.finished_at is not None
    assert accepted.record.finished_at.timestamp() == later + 2

    duplicate = await finish(store, a2, second, now=later + 3)
    assert not duplicate.changed
    assert duplicate.record == accepted.record
    with pytest.raises(Conflict):  # a finished run has no phase any more
        await store.set_phase(run_id, 2, "second", Phase.UPLOADING, None)
    with pytest.raises(Conflict):
        await finish(store, a1, first, now=later + 4)


async def test_finish_of_an_unknown_run_is_not_found(store: SqliteStore) -> None:
    await register(store)
    with pytest.raises(NotFound):
        await store.finish("nope", 1, "w1", Outcome(Reason.SUCCESS), T0)


async def test_finish_of_a_queued_run_is_a_conflict(store: SqliteStore) -> None:
    queued = await submit(store, 1)
    with pytest.raises(Conflict):
        await store.finish(queued.record.run_id, 0, "w1", Outcome(Reason.SUCCESS), T0)


async def test_set_phase_records_phase_and_digest(store: SqliteStore) -> None:
    await submit(store, 1)
    worker = await register(store)
    a = await claim(store, worker)
    assert a is not None
    run_id = a.record.run_id
    pulled = await store.set_phase(run_id, 1, "w1", Phase.PULLING, None)
    assert pulled.phase is Phase.PULLING and pulled.image_digest is None
    running = await store.set_phase(run_id, 1, "w1", Phase.RUNNING, "sha256:abc")
    assert running.phase is Phase.RUNNING and running.image_digest == "sha256:abc"
    kept = await store.set_phase(run_id, 1, "w1", Phase.UPLOADING, None)
    assert kept.image_digest == "sha256:abc"
    done = await finish(store, a, worker, now=T0 + 1)
    assert done.record.phase is None


async def test_finish_records_the_outcome(store: SqliteStore) -> None:
    await submit(store, 1)
    worker = await register(store)
    a = await claim(store, worker)
    assert a is not None
    outputs = {"out/a.txt": OutputRef(key="a" * 64, size=3)}
    outcome = Outcome(
        Reason.FAILED,
        exit_code=137,
        message="killed: out of memory",
        outputs=outputs,
        log_bytes=1234,
        image_digest="sha256:def",
    )
    change = await store.finish(a.record.run_id, 1, "w1", outcome, T0 + 5)
    record = change.record
    assert (record.state, record.reason, record.exit_code) == (
        RunState.FINISHED,
        Reason.FAILED,
        137,
    )
    assert record.message == "killed: out of memory"
    assert record.outputs == outputs
    assert record.log_bytes == 1234
    assert record.image_digest == "sha256:def"
    assert await store.get_run(record.run_id) == record
    assert await store.heartbeat("w1", T0 + 6, LEASE) == []


async def test_lost_max_lost_times_finishes_worker_lost(store: SqliteStore) -> None:
    queued = await submit(store, 1)
    now = T0
    records = []
    for i in range(MAX_LOST):
        worker = await register(store, f"w{i}", now=now)
        a = await claim(store, worker, now)
        assert a is not None and a.fence == i + 1
        now += LEASE + 1
        [record] = await store.expire_leases(now, MAX_LOST)
        records.append(record)
    assert [r.state for r in records] == [RunState.QUEUED] * (MAX_LOST - 1) + [RunState.FINISHED]
    assert [r.lost_count for r in records] == list(range(1, MAX_LOST + 1))
    last = records[-1]
    assert last.run_id == queued.record.run_id
    assert last.reason is Reason.WORKER_LOST
    assert last.message and str(MAX_LOST) in last.message
    assert await claim(store, await register(store, "late", now=now), now) is None


async def test_give_back_requeues_without_counting(store: SqliteStore) -> None:
    first = await submit(store, 1, now=T0)
    second = await submit(store, 2, now=T0 + 1)
    worker = await register(store)
    a1, a2 = await claim(store, worker), await claim(store, worker)
    assert a1 is not None and a2 is not None
    [back] = await store.give_back("w1", [first.record.run_id])
    assert back.run_id == first.record.run_id
    assert back.state is RunState.QUEUED
    assert back.lost_count == 0
    assert back.worker is None
    assert await store.heartbeat("w1", T0 + 1, LEASE) == [Held(second.record.run_id, 1)]
    # It keeps its place in the queue, ahead of younger runs.
    await submit(store, 3, now=T0 + 2)
    again = await claim(store, worker, T0 + 2)
    assert again is not None
    assert again.record.run_id == first.record.run_id
    assert again.fence == 2
    # None gives back everything.
    everything = await store.give_back("w1", None)
    assert sorted(r.run_id for r in everything) == sorted(
        [first.record.run_id, second.record.run_id]
    )
    assert all(r.lost_count == 0 for r in everything)
    assert await store.heartbeat("w1", T0 + 3, LEASE) == []


async def test_drop_worker(store: SqliteStore) -> None:
    await submit(store, 1)
    worker = await register(store)
    assert await claim(store, worker) is not None
    with pytest.raises(Conflict):
        await store.drop_worker("w1")
    await store.give_back("w1", None)
    await store.drop_worker("w1")
    with pytest.raises(NotFound):
        await store.heartbeat("w1", T0, LEASE)
    assert await store.workers() == []


async def test_heartbeat_renews_the_lease_and_lists_held_runs(store: SqliteStore) -> None:
    await submit(store, 1)
    worker = await register(store)
    a = await claim(store, worker)
    assert a is not None
    assert await store.heartbeat("w1", T0 + 20, LEASE) == [Held(a.record.run_id, 1)]
    # The old deadline (T0 + LEASE) has passed, the new one (T0 + 20 + LEASE) has not.
    assert await store.expire_leases(T0 + 20 + LEASE - 0.5, MAX_LOST) == []
    assert await claim(store, worker, T0 + 20 + LEASE - 0.5) is None  # lease still live
    [lost] = await store.expire_leases(T0 + 20 + LEASE + 0.5, MAX_LOST)
    assert lost.run_id == a.record.run_id


async def test_heartbeat_of_an_unknown_worker_is_not_found(store: SqliteStore) -> None:
    with pytest.raises(NotFound):
        await store.heartbeat("ghost", T0, LEASE)


async def test_reregistration_requeues_what_the_worker_does_not_report(
    store: SqliteStore,
) -> None:
    await store.submit([request(n) for n in range(3)], T0)
    worker = await register(store)
    a = [await claim(store, worker) for _ in range(3)]
    assert all(x is not None for x in a)
    kept_run, stale_run, forgotten_run = (x.record.run_id for x in a if x is not None)
    registration = await store.register_worker(
        worker,
        [Held(kept_run, 1), Held(stale_run, 7)],  # the second one under a fence it never had
        T0 + 5,
        LEASE,
        MAX_LOST,
    )
    assert registration.kept == [Held(kept_run, 1)]
    assert sorted(r.run_id for r in registration.lost) == sorted([stale_run, forgotten_run])
    for record in registration.lost:
        assert record.state is RunState.QUEUED
        assert record.lost_count == 1
    kept = await store.get_run(kept_run)
    assert kept is not None and kept.state is RunState.RUNNING and kept.lost_count == 0
    assert await store.heartbeat("w1", T0 + 6, LEASE) == [Held(kept_run, 1)]


async def test_reregistration_with_everything_reported_keeps_everything(
    store: SqliteStore,
) -> None:
    await submit(store, 1)
    worker = await register(store)
    a = await claim(store, worker)
    assert a is not None
    held = [Held(a.record.run_id, a.fence)]
    registration = await store.register_worker(worker, held, T0 + 5, LEASE, MAX_LOST)
    assert registration.kept == held
    assert registration.lost == []
    # The re-registration renewed the lease.
    assert await store.expire_leases(T0 + 5 + LEASE - 1, MAX_LOST) == []


@pytest.mark.parametrize("namespace", [None, "cell:x"])
async def test_late_result_for_a_run_the_host_ended_is_a_conflict(
    store: SqliteStore, namespace: str | None
) -> None:
    queued = await submit(store, 1, namespace=namespace or "_")
    worker = await register(store)
    a = await claim(store, worker)
    assert a is not None
    if namespace is None:
        await store.cancel("q", queued.record.job_id, None, T0 + 1)
        expected = Reason.CANCELLED
    else:
        await submit(store, 2, namespace=namespace, now=T0 + 1)
        expected = Reason.REPLACED
    with pytest.raises(Conflict):
        await finish(store, a, worker, now=T0 + 2)
    with pytest.raises(Conflict):
        await store.set_phase(a.record.run_id, a.fence, "w1", Phase.RUNNING, None)
    stored = await store.get_run(a.record.run_id)
    assert stored is not None and stored.reason is expected


async def test_extend_leases_gives_every_live_worker_a_fresh_lease(store: SqliteStore) -> None:
    await store.submit([request(1), request(2)], T0)
    live = await register(store, "live")
    gone = await register(store, "gone", now=T0 - 100)
    a = await claim(store, live)
    assert a is not None
    # "gone" holds nothing and its lease ran out while the host was up.
    assert await store.expire_leases(T0, MAX_LOST) == []
    down_until = T0 + 1000  # the host was down: "live" could not renew
    await store.extend_leases(down_until, LEASE)
    assert await store.expire_leases(down_until + LEASE - 1, MAX_LOST) == []
    assert await store.heartbeat("live", down_until + 1, LEASE) == [Held(a.record.run_id, 1)]
    with pytest.raises(NotFound):  # an expired lease stays expired
        await claim(store, gone, down_until + 1)
    [lost] = await store.expire_leases(down_until + 1 + LEASE + 1, MAX_LOST)
    assert lost.run_id == a.record.run_id


async def test_workers_listing(store: SqliteStore) -> None:
    await submit(store, 1, queue="a")
    w1 = await register(store, "w1", queues=("a", "b"), cpus=2, memory=GiB, tags={"gpu"})
    await register(store, "w2", queues=("c",), now=T0 + 1)
    a = await claim(store, w1)
    assert a is not None
    everyone = await store.workers()
    assert [w["id"] for w in everyone] == ["w1", "w2"]
    [only] = await store.workers("b")
    assert only["id"] == "w1"
    assert only["queues"] == ["a", "b"]
    assert only["tags"] == ["gpu"]
    assert only["capacity"] == {"cpus": 2, "memory": GiB, "gpus": 0}
    assert only["running"] == [{"runId": a.record.run_id, "queue": a.record.queue}]
    assert only["leaseExpires"] == T0 + LEASE
    assert only["version"] == "1.0"
    assert await store.workers("zzz") == []
