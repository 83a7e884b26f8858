"""The queue service over a real store, log files and blob folder, with scripted workers."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

import pytest

from jupyter_compute_queue.host.access import ANONYMOUS, Identity
from jupyter_compute_queue.host.events import LogsAppended, RunChanged
from jupyter_compute_queue.host.service import BadRequest, Forbidden, QueueService, TooLarge
from jupyter_compute_queue.host.store.base import Conflict, NotFound, Outcome
from jupyter_compute_queue.model.runs import Reason, RunState

from ..conftest import USER, Clock, connect

JOB = {"image": "busybox", "command": "echo hi"}


def job(n: int) -> dict[str, object]:
    return {"image": "busybox", "command": ["echo", str(n)]}


async def test_submit_answers_and_validates(service: QueueService) -> None:
    answer = await service.submit(USER, "q", JOB)
    assert answer["state"] == "Queued" and answer["cached"] is False
    assert answer["url"] == f"q/q/j/{answer['jobId']}"
    again = await service.submit(USER, "q", {"definition": JOB, "namespace": "cell:1"})
    assert again["runId"] == answer["runId"]
    batch = await service.submit(USER, "q", [job(1), {"definition": job(2)}])
    assert [a["state"] for a in batch] == ["Queued", "Queued"]

    with pytest.raises(BadRequest, match=r"^requirements\.memory: "):
        await service.submit(USER, "q", {"image": "x", "requirements": {"memory": "lots"}})
    with pytest.raises(BadRequest, match=r"^\[1\]foo: unknown field"):
        await service.submit(USER, "q", [JOB, {"image": "x", "foo": 1}])
    with pytest.raises(BadRequest, match="namespace"):
        await service.submit(USER, "q", {"definition": JOB, "namespace": "a b"})
    with pytest.raises(BadRequest, match="queue name"):
        await service.submit(USER, "bad/queue", JOB)


async def test_definition_size_limit(make_service: Callable[..., QueueService]) -> None:
    svc = make_service(max_definition_bytes=1000)
    await svc.store.open()
    big = {"image": "x", "env": {"A": "x" * 2000}}
    with pytest.raises(TooLarge, match="definition: larger than 1000 bytes"):
        await svc.submit(USER, "q", big)
    await svc.store.close()


async def test_key_inputs_must_exist(service: QueueService) -> None:
    data = b"hello blob"
    key = hashlib.sha256(data).hexdigest()
    definition = {"image": "x", "inputs": {"d/in.txt": {"type": "key", "value": key}}}
    with pytest.raises(BadRequest, match=rf"^inputs\.d/in\.txt: blob {key} is not on this host"):
        await service.submit(USER, "q", definition)
    await service.blobs.put(key, data)
    answer = await service.submit(USER, "q", definition)
    inline = {"image": "x", "inputs": {"d/in.txt": {"type": "utf8", "value": "hello blob"}}}
    # The same bytes sent inline are the same job: the key-ref submission is joined.
    assert (await service.submit(USER, "q", inline))["runId"] == answer["runId"]


async def test_a_run_seen_live_from_queue_to_finish(service: QueueService) -> None:
    with service.bus.subscribe("q") as sub:
        answer = await service.submit(USER, "q", JOB)
        worker = await connect(service, "w1")
        [assignment] = worker.assigned
        assert assignment.record.run_id == answer["runId"]
        assert assignment.definition == JOB
        run_id, fence = answer["runId"], assignment.fence
        end = service.append_logs("w1", run_id, fence, [("out", "hi\n", None)])
        assert end == 3
        record = await service.finish("w1", run_id, fence, Outcome(Reason.SUCCESS, exit_code=0))
        assert record.log_bytes == 3
        seen = []
        while sub._pending:
            seen.append(await sub.get())
    states = [e.record.state for e in seen if isinstance(e, RunChanged)]
    # Coalescing keeps only the newest state of the run that was still pending.
    assert states[-1] is RunState.FINISHED
    assert any(isinstance(e, LogsAppended) and e.end == 3 for e in seen)
    assert service.logs.read_text(run_id) == "hi\n"


async def test_push_fills_free_capacity_then_waits(service: QueueService) -> None:
    answers = [await service.submit(USER, "q", job(i)) for i in range(3)]
    worker = await connect(service, "w1", cpus=2)
    assert [a.record.run_id for a in worker.assigned] == [a["runId"] for a in answers[:2]]
    first = worker.assigned[0]
    await service.finish("w1", first.record.run_id, first.fence, Outcome(Reason.SUCCESS, 0))
    await service.report_free("w1", worker.info.capacity.minus(worker.assigned[1].needs))
    assert [a.record.run_id for a in worker.assigned][2] == answers[2]["runId"]
    # Submitting while a worker has room assigns at once.
    late = await service.submit(USER, "q", job(9))
    assert len(worker.assigned) == 3 and late["state"] == "Queued"


async def test_two_workers_one_job_one_assignment(service: QueueService) -> None:
    a = await connect(service, "a")
    b = await connect(service, "b")
    await service.submit(USER, "q", JOB)
    assert len(a.assigned) + len(b.assigned) == 1


async def test_cancel_is_pushed_to_the_holding_worker(service: QueueService) -> None:
    worker = await connect(service, "w1")
    answer = await service.submit(USER, "q", JOB)
    [assignment] = worker.assigned
    [change] = await service.cancel(USER, "q", answer["jobId"], None)
    assert change.record.reason is Reason.CANCELLED
    assert worker.stopped == [answer["runId"]]
    with pytest.raises(Conflict):
        service.append_logs("w1", answer["runId"], assignment.fence, [("out", "late", None)])
    with pytest.raises(Conflict):
        await service.finish("w1", answer["runId"], assignment.fence, Outcome(Reason.SUCCESS, 0))
    # Cancelling again is a no-op that says so.
    [again] = await service.cancel(USER, None, answer["jobId"], None)
    assert again.changed is False and again.record.reason is Reason.CANCELLED


async def test_namespace_replacement_stops_the_old_container(service: QueueService) -> None:
    worker = await connect(service, "w1")
    first = await service.submit(USER, "q", {"definition": job(1), "namespace": "cell:x"})
    assert len(worker.assigned) == 1
    await service.submit(USER, "other", {"definition": job(2), "namespace": "cell:x"})
    assert worker.stopped == [first["runId"]]
    record = await service.store.get_run(first["runId"])
    assert record is not None and record.reason is Reason.REPLACED


async def test_expired_lease_requeues_to_another_worker(
    service: QueueService, clock: Clock
) -> None:
    first = await connect(service, "w1")
    answer = await service.submit(USER, "q", JOB)
    [old] = first.assigned
    second = await connect(service, "w2")
    assert second.assigned == []
    clock.advance(service.config.lease_seconds / 2)
    await service.heartbeat("w2")
    clock.advance(service.config.lease_seconds / 2 + 1)
    changed = await service.expire_leases()
    assert [r.run_id for r in changed] == [answer["runId"]]
    [new] = second.assigned
    assert new.record.run_id == answer["runId"] and new.fence == old.fence + 1
    assert new.record.lost_count == 1
    with pytest.raises(Conflict):
        await service.finish("w1", answer["runId"], old.fence, Outcome(Reason.SUCCESS, 0))
    done = await service.finish("w2", answer["runId"], new.fence, Outcome(Reason.SUCCESS, 0))
    assert done.reason is Reason.SUCCESS


async def test_graceful_disconnect_gives_runs_back(service: QueueService) -> None:
    first = await connect(service, "w1")
    answer = await service.submit(USER, "q", JOB)
    assert len(first.assigned) == 1
    second = await connect(service, "w2")
    await service.disconnect_worker("w1", graceful=True)
    [again] = second.assigned
    assert again.record.run_id == answer["runId"] and again.record.lost_count == 0


async def test_reconnect_keeps_reported_runs(service: QueueService) -> None:
    worker = await connect(service, "w1", cpus=2)
    await service.submit(USER, "q", job(1))
    await service.submit(USER, "q", job(2))
    kept_run, lost_run = worker.assigned
    await service.disconnect_worker("w1", graceful=False)
    from jupyter_compute_queue.host.store.base import Held

    kept = await service.connect_worker(
        USER,
        worker.info,
        [Held(kept_run.record.run_id, kept_run.fence)],
        worker.deliver,
        worker.stop,
    )
    assert [h.run_id for h in kept] == [kept_run.record.run_id]
    lost = await service.store.get_run(lost_run.record.run_id)
    assert lost is not None and lost.state is RunState.QUEUED and lost.lost_count == 1
    # The kept run's fence is live again: its logs are accepted.
    service.append_logs("w1", kept_run.record.run_id, kept_run.fence, [("out", "x", None)])


async def test_retention_sweeps_runs_logs_and_blobs(service: QueueService, clock: Clock) -> None:
    used, unused = b"used input", b"nobody wants me"
    used_key, unused_key = (hashlib.sha256(b).hexdigest() for b in (used, unused))
    await service.blobs.put(used_key, used)
    await service.blobs.put(unused_key, unused)
    keep = await service.submit(
        USER, "q", {"image": "x", "inputs": {"a": {"type": "key", "value": used_key}}}
    )
    worker = await connect(service, "w1")
    await service.submit(USER, "q", job(1))  # queued behind `keep`, never finished
    [assignment] = worker.assigned
    service.append_logs("w1", keep["runId"], assignment.fence, [("out", "bye", None)])
    await service.finish("w1", keep["runId"], assignment.fence, Outcome(Reason.SUCCESS, 0))
    # Both blobs untouched for two days; only the one no job refers to goes.
    for key in (used_key, unused_key):
        path = service.blobs.local_path(key)
        assert path is not None
        os.utime(path, (clock.now - 2 * 86400, clock.now - 2 * 86400))
    runs, blobs = await service.sweep()
    assert (runs, blobs) == (0, 1)
    assert not await service.blobs.exists(unused_key) and await service.blobs.exists(used_key)

    clock.advance(service.config.retention_days * 86400 + 10)
    runs, blobs = await service.sweep()
    # The finished run and its log go; its job is left with no run, so the job goes too and
    # with it the last reference to the input blob. The queued run stays.
    assert (runs, blobs) == (1, 1)
    assert await service.store.get_run(keep["runId"]) is None
    assert service.logs.size(keep["runId"]) == 0
    assert not await service.blobs.exists(used_key)
    assert (await service.store.counts("q")).by_state[RunState.QUEUED] == 1


async def test_private_host_refuses_anonymous(service: QueueService) -> None:
    with pytest.raises(Forbidden, match="anonymous"):
        await service.submit(ANONYMOUS, "q", JOB)
    worker = Identity("worker", queues=frozenset({"q"}))
    with pytest.raises(Forbidden, match="worker token"):
        await service.submit(worker, "q", JOB)


async def test_public_mode_hides_local(make_service: Callable[..., QueueService]) -> None:
    svc = make_service(public=True)
    await svc.store.open()
    answer = await svc.submit(ANONYMOUS, "open-queue", JOB)
    with pytest.raises(Forbidden):
        await svc.submit(ANONYMOUS, "local", JOB)
    await svc.submit(USER, "local", JOB)
    seen = await svc.get_job(ANONYMOUS, answer["jobId"])
    assert {r["queue"] for r in seen["runs"]} == {"open-queue"}
    assert {r["queue"] for r in (await svc.get_job(USER, answer["jobId"]))["runs"]} == {
        "open-queue",
        "local",
    }
    local_only = await svc.submit(USER, "local", job(5))
    with pytest.raises(NotFound):
        await svc.get_job(ANONYMOUS, local_only["jobId"])
    with pytest.raises(Forbidden):
        await svc.copy(ANONYMOUS, answer["jobId"], "local", None)
    await svc.store.close()


@pytest.mark.parametrize(("public", "shared"), [(False, True), (True, False)])
async def test_host_cache_scope(
    make_service: Callable[..., QueueService], public: bool, shared: bool
) -> None:
    svc = make_service(cache_scope="host", public=public)
    await svc.store.open()
    worker = await connect(svc, "w1", queues=("a",))
    first = await svc.submit(USER, "a", JOB)
    [assignment] = worker.assigned
    await svc.finish("w1", first["runId"], assignment.fence, Outcome(Reason.SUCCESS, 0))
    other = await svc.submit(USER, "b", JOB)
    assert other["cached"] is shared
    assert (other["runId"] == first["runId"]) is shared
    await svc.store.close()


async def test_copy_and_forget(service: QueueService) -> None:
    worker = await connect(service, "w1")
    first = await service.submit(USER, "q", JOB)
    [assignment] = worker.assigned
    await service.finish("w1", first["runId"], assignment.fence, Outcome(Reason.SUCCESS, 0))
    assert (await service.submit(USER, "q", JOB))["cached"] is True
    copied = await service.copy(USER, first["jobId"], "elsewhere", None)
    assert copied["queue"] == "elsewhere" and copied["jobId"] == first["jobId"]
    assert await service.forget(USER, "q", first["jobId"]) == 1
    assert (await service.submit(USER, "q", JOB))["cached"] is False


async def test_status_and_listing(service: QueueService) -> None:
    await connect(service, "w1")
    for i in range(3):
        await service.submit(USER, "q", job(i))
    status = await service.status(USER, "q")
    assert status["counts"] == {"Queued": 2, "Running": 1, "Finished": 0}
    assert [w["id"] for w in status["workers"]] == ["w1"]
    assert status["workers"][0]["connected"] is True
    page = await service.list_runs(USER, "q", states=["Queued"], limit=1)
    assert len(page.runs) == 1 and page.cursor is not None
    with pytest.raises(BadRequest, match="state"):
        await service.list_runs(USER, "q", states=["Sleeping"])


async def test_reading_a_job_postpones_its_retention(service: QueueService, clock: Clock) -> None:
    worker = await connect(service, "w1")
    answer = await service.submit(USER, "q", JOB)
    [assignment] = worker.assigned
    await service.finish("w1", answer["runId"], assignment.fence, Outcome(Reason.SUCCESS, 0))
    days = service.config.retention_days
    clock.advance((days - 1) * 86400)
    await service.get_job(USER, answer["jobId"])
    clock.advance(2 * 86400)
    assert (await service.sweep())[0] == 0
    clock.advance(days * 86400)
    assert (await service.sweep())[0] == 1
