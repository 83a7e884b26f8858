"""The worker socket's ``batch`` message (docs/protocol.md, "Batches") over a real server: its
messages are handled in order as if each came alone, answers keep their order, and the host
batches what it sends only to a worker that said it takes batches."""

from __future__ import annotations

from typing import Any

from .conftest import Fetch, body
from .scripted import Worker, WsFetch, watch


def job(n: int) -> dict[str, Any]:
    return {"image": "busybox", "command": ["echo", str(n)]}


def phase(run_id: str, fence: int, value: str) -> dict[str, Any]:
    return {"type": "phase", "runId": run_id, "fence": fence, "phase": value}


def result(run_id: str, fence: int, reason: str = "Success") -> dict[str, Any]:
    code = 0 if reason == "Success" else 1
    return {"type": "result", "runId": run_id, "fence": fence, "reason": reason, "exitCode": code}


async def assigned(worker: Worker, n: int) -> list[dict[str, Any]]:
    """The next n assignments, whether they came one per frame or batched."""
    out: list[dict[str, Any]] = []
    while len(out) < n:
        message = await worker.next()
        inner = message["messages"] if message["type"] == "batch" else [message]
        out += [m for m in inner if m["type"] == "assign"]
    return out


async def answers(worker: Worker, n: int) -> list[dict[str, Any]]:
    """The next n messages, batches unpacked."""
    out: list[dict[str, Any]] = []
    while len(out) < n:
        message = await worker.next()
        out += message["messages"] if message["type"] == "batch" else [message]
    return out


async def test_a_batch_is_handled_in_order_and_its_answers_keep_their_order(
    fetch: Fetch, jp_ws_fetch: WsFetch
) -> None:
    client = await watch(jp_ws_fetch)
    worker, registered = await Worker.connect(jp_ws_fetch, "bw", cpus=3)
    assert registered["batch"] is True  # the host says it takes batches
    await fetch("q", "q", method="POST", json=[job(i) for i in range(3)])
    runs = await assigned(worker, 3)
    (a, fa), (b, fb), (c, fc) = [(r["runId"], r["fence"]) for r in runs]

    await worker.send(
        {
            "type": "batch",
            "messages": [
                phase(a, fa, "running"),
                phase(b, fb, "running"),
                result(a, fa),
                phase(b, fb, "dancing"),  # refused: its error comes after a's answer
                result(b, fb + 1),  # a stale fence: conflict
                7,  # not a message
                {"type": "batch", "messages": []},  # no batch in a batch
                result(b, fb, "Failed"),
                phase(c, fc, "uploading"),
                result(c, fc),
                {"type": "heartbeat"},  # waits for the results before it: holds none of them
            ],
        }
    )
    got = await answers(worker, 7)
    assert [(m["type"], m.get("runId")) for m in got] == [
        ("accepted", a),
        ("error", None),
        ("conflict", b),
        ("error", None),
        ("error", None),
        ("accepted", b),
        ("accepted", c),
    ]
    assert got[1]["ref"] == "phase" and "phase: one of" in got[1]["error"]
    assert '"type"' in got[3]["error"] and "no batches" in got[4]["error"]
    assert got[3]["ref"] == got[4]["ref"] == "batch"
    assert got[0]["run"]["reason"] == "Success" and got[5]["run"]["reason"] == "Failed"
    heartbeat = await worker.expect("heartbeat")
    assert heartbeat["held"] == []
    for run_id, reason in ((a, "Success"), (b, "Failed"), (c, "Success")):
        job_id = next(r for r in runs if r["runId"] == run_id)["jobId"]
        record = body(await fetch("q", "q", "j", job_id))["runs"][0]
        assert record["state"] == "Finished" and record["reason"] == reason, record
    # Watchers saw the phases, in order, before each run finished.
    seen = [
        (m["run"]["runId"], m["run"]["phase"], m["run"]["state"])
        for m in client.seen
        if m["type"] == "run" and m["run"]["runId"] == b
    ]
    while (b, None, "Finished") not in seen:
        message = await client.expect("run")
        if message["run"]["runId"] == b:
            seen.append((b, message["run"]["phase"], message["run"]["state"]))
    assert seen.index((b, "running", "Running")) < seen.index((b, None, "Finished"))


async def test_a_phase_after_its_runs_result_in_one_batch_is_answered_as_alone(
    fetch: Fetch, jp_ws_fetch: WsFetch
) -> None:
    """The phase waits for the result before it: the run has finished, so it is a conflict."""
    worker, _ = await Worker.connect(jp_ws_fetch, "late")
    await fetch("q", "q", method="POST", json=job(1))
    (run,) = await assigned(worker, 1)
    run_id, fence = run["runId"], run["fence"]
    await worker.send(
        {"type": "batch", "messages": [result(run_id, fence), phase(run_id, fence, "running")]}
    )
    got = await answers(worker, 2)
    assert [m["type"] for m in got] == ["accepted", "conflict"]


async def test_a_batch_before_register_is_refused(jp_ws_fetch: WsFetch) -> None:
    raw = Worker(await jp_ws_fetch("compute-queue", "worker"), "raw")
    await raw.send({"type": "batch", "messages": [{"type": "heartbeat"}]})
    error = await raw.expect("error")
    assert error["ref"] == "batch" and "register first" in error["error"]
    await raw.send({"type": "batch"})
    assert "register first" in (await raw.expect("error"))["error"]
    raw.close()


async def test_only_a_worker_that_takes_batches_gets_them(
    fetch: Fetch, jp_ws_fetch: WsFetch
) -> None:
    old, _ = await Worker.connect(jp_ws_fetch, "old", queues=("old",), cpus=3)
    await fetch("q", "old", method="POST", json=[job(i) for i in range(3)])
    frames = [await old.next() for _ in range(3)]
    assert [m["type"] for m in frames] == ["assign"] * 3

    conn = await jp_ws_fetch("compute-queue", "worker")
    new = Worker(conn, "new")
    await new.send(
        {
            "type": "register",
            "protocol": 1,
            "id": "new",
            "capacity": {"cpus": 3, "memory": None, "gpus": 0},
            "queues": ["new"],
            "batch": True,
        }
    )
    await new.expect("registered")
    await fetch("q", "new", method="POST", json=[job(i) for i in range(3)])
    await new.send({"type": "capacity", "free": {"cpus": 3, "memory": None, "gpus": 0}})
    frame = await new.next()
    assert frame["type"] == "batch"
    assert [m["type"] for m in frame["messages"]] == ["assign"] * 3
    await new.send(
        {"type": "batch", "messages": [result(m["runId"], m["fence"]) for m in frame["messages"]]}
    )
    done = await new.next()
    assert done["type"] == "batch" and [m["type"] for m in done["messages"]] == ["accepted"] * 3
