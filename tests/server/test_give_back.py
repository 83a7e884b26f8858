"""``give-back`` over the real worker websocket: uncounted (SIGTERM) or ``counted`` (the worker
lost the run under it, e.g. its Docker engine went away), which counts like a lease expiry and
ends the run ``WorkerLost`` at ``max_lost`` (docs/protocol.md)."""

from __future__ import annotations

from typing import Any

from .conftest import Fetch, body
from .scripted import Worker, WsFetch

JOB = {"image": "busybox", "command": "echo hi"}
FREE = {"type": "capacity", "free": {"cpus": 1, "memory": None, "gpus": 0}}


async def record(fetch: Fetch, job_id: str) -> dict[str, Any]:
    result: dict[str, Any] = body(await fetch("q", "q", "j", job_id, "result.json"))
    return result


async def test_counted_give_backs_end_the_run_worker_lost(
    fetch: Fetch, jp_ws_fetch: WsFetch
) -> None:
    worker, _ = await Worker.connect(jp_ws_fetch, "w1")
    answer = body(await fetch("q", "q", method="POST", json=JOB))
    job_id = answer["jobId"]
    assign = await worker.expect("assign")
    assert assign["attempt"] == 1

    # Uncounted (absent, then false): back in the queue, no loss counted, offered again once
    # the worker reports room for it.
    for counted in ({}, {"counted": False}):
        await worker.send({"type": "give-back", "runIds": [assign["runId"]], **counted})
        await worker.send(FREE)
        again = await worker.expect("assign")
        assert again["runId"] == answer["runId"] and again["fence"] == assign["fence"] + 1
        assign = again
        assert (await record(fetch, job_id))["lostCount"] == 0

    # Counted: a loss each time; the max_lost-th (3) ends the run.
    for lost in (1, 2, 3):
        await worker.send({"type": "give-back", "runIds": [assign["runId"]], "counted": True})
        if lost < 3:
            await worker.send(FREE)
            again = await worker.expect("assign")
            assert again["fence"] == assign["fence"] + 1
            assign = again
            now = await record(fetch, job_id)
            assert now["state"] == "Running" and now["lostCount"] == lost, now
    # A give-back has no answer; the heartbeat's comes after it is handled (in order).
    await worker.send(FREE)
    await worker.send({"type": "heartbeat"})
    assert (await worker.expect("heartbeat"))["held"] == []
    final = await record(fetch, job_id)
    assert final["state"] == "Finished" and final["reason"] == "WorkerLost", final
    assert final["lostCount"] == 3 and final["attempt"] == 5, final
    assert "the limit is 3" in final["message"], final

    # Nothing more came to the worker, and a late result for the run is refused.
    assert [m for m in worker.seen if m["type"] == "assign"][-1]["fence"] == assign["fence"]
    late = await worker.result(assign["runId"], assign["fence"])
    assert late["type"] == "conflict", late
    assert (await record(fetch, job_id))["reason"] == "WorkerLost"


async def test_a_counted_that_is_not_a_bool_is_an_error(fetch: Fetch, jp_ws_fetch: WsFetch) -> None:
    worker, _ = await Worker.connect(jp_ws_fetch, "w1")
    answer = body(await fetch("q", "q", method="POST", json=JOB))
    assign = await worker.expect("assign")
    for bad in ("yes", 1, 0, [True], {"x": 1}):
        await worker.send({"type": "give-back", "runIds": [assign["runId"]], "counted": bad})
        error = await worker.expect("error")
        assert error == {
            "type": "error",
            "error": "give-back: 'counted' has the wrong type",
            "ref": "give-back",
        }, bad
    # None of them gave the run back: it is still the worker's, nothing counted.
    await worker.send({"type": "heartbeat"})
    held = (await worker.expect("heartbeat"))["held"]
    assert held == [{"runId": assign["runId"], "fence": assign["fence"]}]
    assert (await record(fetch, answer["jobId"]))["lostCount"] == 0


async def test_run_ids_that_are_not_strings_are_an_error(
    fetch: Fetch, jp_ws_fetch: WsFetch
) -> None:
    """Unhashable ids used to raise out of the handler (and drop the worker's socket)."""
    worker, _ = await Worker.connect(jp_ws_fetch, "w1")
    await fetch("q", "q", method="POST", json=JOB)
    assign = await worker.expect("assign")
    for bad in ([{}], [["x"]], [5]):
        await worker.send({"type": "give-back", "runIds": bad})
        error = await worker.expect("error")
        assert error["error"] == "give-back: 'runIds' is a list of run ids", bad
    await worker.send({"type": "heartbeat"})
    held = (await worker.expect("heartbeat"))["held"]
    assert held == [{"runId": assign["runId"], "fence": assign["fence"]}]
