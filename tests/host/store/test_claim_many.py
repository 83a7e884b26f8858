"""Batch claims and deferred phases: the shortcuts the dispatcher takes under load must give
what the one-at-a-time operations give."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from jupyter_compute_queue.host.store.base import NotFound
from jupyter_compute_queue.host.store.sqlite import SqliteStore
from jupyter_compute_queue.model.capacity import Capacity
from jupyter_compute_queue.model.runs import Phase

from .conftest import T0, claim, finish, register, request, submit

GiB = 1024**3


def _random_runs(rng: random.Random, n: int) -> list[tuple[str, dict[str, object]]]:
    runs: list[tuple[str, dict[str, object]]] = []
    for i in range(n):
        fields: dict[str, object] = {"image": "busybox:1.36", "command": ["echo", str(i)]}
        requirements: dict[str, object] = {}
        if rng.random() < 0.7:
            requirements["cpus"] = rng.choice([0.5, 1, 2, 3])
        if rng.random() < 0.5:
            requirements["memory"] = rng.choice([GiB // 2, GiB, 3 * GiB])
        if rng.random() < 0.2:
            requirements["gpus"] = rng.choice([1, 2])
        if requirements:
            fields["requirements"] = requirements
        if rng.random() < 0.2:
            fields["tags"] = [rng.choice(["gpu", "big", "eu"])]
        runs.append((rng.choice(["q1", "q2", "q3"]), fields))
    return runs


async def _store(path: Path, runs: list[tuple[str, dict[str, object]]]) -> SqliteStore:
    from jupyter_compute_queue.model.jobs import parse_definition

    store = SqliteStore(path)
    await store.open()
    for queue, fields in runs:
        await store.submit([request(parse_definition(fields), queue)], T0)
    return store


@pytest.mark.parametrize("seed", range(12))
async def test_claim_many_takes_what_repeated_claims_take(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    runs = _random_runs(rng, rng.randint(1, 150))
    memory = rng.choice([None, GiB, 4 * GiB])
    free = Capacity(rng.choice([1, 2, 4, 8, 64]), memory, rng.randint(0, 2))
    limit = rng.choice([1, 3, 32, 1000])
    queues = tuple(rng.sample(["q1", "q2", "q3"], rng.randint(1, 3)))
    tags = frozenset(rng.sample(["gpu", "big", "eu"], rng.randint(0, 2)))
    one, many = await _store(tmp_path / "one.db", runs), await _store(tmp_path / "many.db", runs)
    try:
        kw = {"queues": queues, "cpus": free.cpus, "memory": free.memory, "gpus": free.gpus}
        w1 = await register(one, tags=tags, **kw)  # type: ignore[arg-type]
        w2 = await register(many, tags=tags, **kw)  # type: ignore[arg-type]
        expected = []
        room = free
        while len(expected) < limit:
            a = await claim(one, w1, free=room)
            if a is None:
                break
            expected.append((a.record.job_id, a.record.queue, a.fence, a.needs, a.definition))
            room = room.minus(a.needs)
        got = [
            (a.record.job_id, a.record.queue, a.fence, a.needs, a.definition)
            for a in await many.claim_many(w2, free, T0, limit)
        ]
        assert got == expected
        # What is left queued is the same too.
        left_one = await one.counts("q1"), await one.counts("q2"), await one.counts("q3")
        left_many = await many.counts("q1"), await many.counts("q2"), await many.counts("q3")
        assert left_many == left_one
    finally:
        await one.close()
        await many.close()


async def test_claim_many_needs_a_live_lease(store: SqliteStore) -> None:
    await submit(store, 1)
    worker = await register(store)
    with pytest.raises(NotFound, match="no live lease"):
        await store.claim_many(worker, worker.capacity, T0 + 3600, 10)
    assert (await store.counts("q")).by_state  # the run stayed queued
    [again] = await store.claim_many(worker, worker.capacity, T0, 10)
    assert again.record.state.value == "Running"


async def test_deferred_phases_keep_the_latest_and_the_digest(store: SqliteStore) -> None:
    await submit(store, 1)
    worker = await register(store)
    a = await claim(store, worker)
    assert a is not None
    run_id = a.record.run_id
    store.set_phase_later(run_id, a.fence, "w1", Phase.PULLING, None)
    store.set_phase_later(run_id, a.fence, "w1", Phase.RUNNING, "sha256:abc")
    await store.set_phase_later(run_id, a.fence, "w1", Phase.UPLOADING, None)
    record = await store.get_run(run_id)
    assert record is not None
    assert record.phase is Phase.UPLOADING and record.image_digest == "sha256:abc"


async def test_a_deferred_phase_never_touches_a_run_that_moved_on(store: SqliteStore) -> None:
    await submit(store, 1)
    worker = await register(store)
    a = await claim(store, worker)
    assert a is not None
    await store.set_phase_later(a.record.run_id, a.fence + 1, "w1", Phase.RUNNING, None)
    await store.set_phase_later(a.record.run_id, a.fence, "w2", Phase.RUNNING, None)
    record = await store.get_run(a.record.run_id)
    assert record is not None and record.phase is None  # neither fence nor worker is its own
    # Queued before the result, stored in the same order: the finished run has no phase.
    store.set_phase_later(a.record.run_id, a.fence, "w1", Phase.UPLOADING, None)
    done = await finish(store, a, worker, now=T0 + 1)
    record = await store.get_run(a.record.run_id)
    assert record is not None and done.record.phase is None and record.phase is None
    assert record.state.value == "Finished"
