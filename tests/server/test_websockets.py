"""Both websockets over a real server: a scripted worker and watching clients."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from .conftest import Fetch, body
from .scripted import Worker, WsFetch, watch

JOB = {"image": "busybox", "command": "echo hi"}


def job(n: int) -> dict[str, Any]:
    return {"image": "busybox", "command": ["echo", str(n)]}


async def read_logs(client: Any, run_id: str, until_done: bool = True) -> tuple[str, int, bool]:
    """Collect one run's log messages: (text, next offset, done)."""
    text, offset = "", 0
    while True:
        message = await client.expect("logs", runId=run_id)
        assert all(r["o"] >= offset for r in message["records"]), "records went backwards"
        text += "".join(r["d"] for r in message["records"])
        offset = message["next"]
        if message["done"] or not until_done:
            return text, offset, message["done"]


async def test_a_run_seen_live_and_a_reconnect_misses_nothing(
    fetch: Fetch, jp_ws_fetch: WsFetch
) -> None:
    client = await watch(jp_ws_fetch)
    answer = body(await fetch("q", "q", method="POST", json=JOB))
    assert (await client.expect("run"))["run"]["state"] == "Queued"
    worker, _ = await Worker.connect(jp_ws_fetch, "w1")
    assign = await worker.expect("assign")
    run_id, fence = assign["runId"], assign["fence"]
    assert run_id == answer["runId"] and assign["definition"] == JOB
    assert (await client.expect("run"))["run"]["state"] == "Running"

    lines = [f"line {i}\n" for i in range(300)]
    await worker.logs(run_id, fence, *lines[:100])
    await client.send({"type": "subscribe", "runId": run_id, "since": 0})
    first, offset, _ = await read_logs(client, run_id, until_done=False)
    assert "".join(lines[:100]).startswith(first)
    client.close()

    await worker.logs(run_id, fence, *lines[100:200])  # nobody watching
    again = await watch(jp_ws_fetch)
    await again.send({"type": "subscribe", "runId": run_id, "since": offset})
    await worker.logs(run_id, fence, *lines[200:])
    accepted = await worker.result(run_id, fence)
    assert accepted["type"] == "accepted" and accepted["run"]["reason"] == "Success"
    rest, _, done = await read_logs(again, run_id)
    assert done and first + rest == "".join(lines)


async def test_two_workers_one_job_one_assignment(fetch: Fetch, jp_ws_fetch: WsFetch) -> None:
    a, _ = await Worker.connect(jp_ws_fetch, "a")
    b, _ = await Worker.connect(jp_ws_fetch, "b")
    await fetch("q", "q", method="POST", json=JOB)
    for worker in (a, b):
        await worker.send({"type": "heartbeat"})
        await worker.expect("heartbeat")
    assigned = [m for w in (a, b) for m in w.seen if m["type"] == "assign"]
    assert len(assigned) == 1


@pytest.mark.parametrize("cq_config", [{"lease_seconds": 1.0}])
async def test_a_silent_worker_loses_its_run_to_the_other(
    fetch: Fetch, jp_ws_fetch: WsFetch
) -> None:
    silent, registered = await Worker.connect(jp_ws_fetch, "silent")
    assert registered["leaseSeconds"] == 1.0
    answer = body(await fetch("q", "q", method="POST", json=JOB))
    old = await silent.expect("assign")
    other, _ = await Worker.connect(jp_ws_fetch, "other")
    # `other` heart-beats; `silent` does not, so its lease runs out and the run moves over.
    deadline = asyncio.get_running_loop().time() + 15
    while not (assigned := [m for m in other.seen if m["type"] == "assign"]):
        assert asyncio.get_running_loop().time() < deadline, "the run never moved over"
        await other.send({"type": "heartbeat"})
        await other.expect("heartbeat")
        await asyncio.sleep(0.1)
    [message] = assigned
    assert message["runId"] == answer["runId"] and message["fence"] == old["fence"] + 1
    late = await silent.result(old["runId"], old["fence"])
    assert late["type"] == "conflict"
    assert (await other.result(message["runId"], message["fence"]))["type"] == "accepted"
    result = body(await fetch("q", "q", "j", answer["jobId"], "result.json"))
    assert result["reason"] == "Success" and result["worker"]["id"] == "other"


async def test_cancel_is_pushed_to_the_worker(fetch: Fetch, jp_ws_fetch: WsFetch) -> None:
    worker, _ = await Worker.connect(jp_ws_fetch, "w1")
    answer = body(await fetch("q", "q", method="POST", json=JOB))
    assign = await worker.expect("assign")
    await fetch("q", "q", "j", answer["jobId"], "cancel", method="POST", body=b"")
    assert (await worker.expect("cancel"))["runId"] == assign["runId"]
    await worker.logs(assign["runId"], assign["fence"], "too late\n")
    assert (await worker.expect("conflict"))["runId"] == assign["runId"]


async def test_a_reconnecting_worker_keeps_what_it_reports(
    fetch: Fetch, jp_ws_fetch: WsFetch
) -> None:
    worker, _ = await Worker.connect(jp_ws_fetch, "w1", cpus=2)
    await fetch("q", "q", method="POST", json=job(1))
    await fetch("q", "q", method="POST", json=job(2))
    kept = await worker.expect("assign")
    lost = await worker.expect("assign")
    worker.close()
    held = [{"runId": kept["runId"], "fence": kept["fence"]}]
    again, registered = await Worker.connect(jp_ws_fetch, "w1", cpus=1, held=held)
    assert registered["kept"] == held
    # The unreported run was requeued at once and, with a CPU free, offered straight back.
    reassigned = await again.expect("assign")
    assert reassigned["runId"] == lost["runId"] and reassigned["fence"] == lost["fence"] + 1
    assert (await again.result(kept["runId"], kept["fence"]))["type"] == "accepted"


async def test_malformed_messages_get_errors_and_the_socket_stays(
    fetch: Fetch, jp_ws_fetch: WsFetch
) -> None:
    raw = Worker(await jp_ws_fetch("compute-queue", "worker"), "x")
    for junk in ["not json", "[1, 2]", '{"no": "type"}', '{"type": "heartbeat"}']:
        await raw.send(junk)
        assert (await raw.expect("error"))["error"]
    worker, _ = await Worker.connect(jp_ws_fetch, "w1")
    for junk in [
        {"type": "dance"},
        {"type": "logs", "runId": 5, "fence": 1, "frames": []},
        {"type": "phase", "runId": "r", "fence": 1, "phase": "sleeping"},
        {"type": "capacity", "free": {"cpus": "many"}},
        {"type": "result", "runId": "r", "fence": 1, "reason": "Bored"},
        {"type": "register", "protocol": 99, "id": "w1", "capacity": {}, "queues": ["q"]},
    ]:
        await worker.send(junk)
        assert (await worker.expect("error"))["error"], junk
    await worker.send({"type": "heartbeat"})
    assert (await worker.expect("heartbeat"))["held"] == []
    client = await watch(jp_ws_fetch)
    await client.send("{{{")
    assert "JSON" in (await client.expect("error"))["error"]
    await client.send({"type": "subscribe", "runId": "nope"})
    assert "no run" in (await client.expect("error"))["error"]
    await client.send({"type": "ping"})
    await client.expect("pong")
    assert (await fetch("healthz")).code == 200


async def test_a_worker_credential_cannot_take_over_another_queues_worker(
    fetch: Fetch, jp_ws_fetch: WsFetch, jp_serverapp: Any
) -> None:
    from jupyter_compute_queue.host.access import worker_credential

    secret = jp_serverapp.web_app.settings["compute_queue"].secret
    victim, _ = await Worker.connect(jp_ws_fetch, "victim", queues=("other",))
    answer = body(await fetch("q", "other", method="POST", json=JOB))
    assign = await victim.expect("assign")
    intruder = Worker(
        await jp_ws_fetch(
            "compute-queue",
            "worker",
            headers={"Authorization": f"token {worker_credential(secret, 'q')}"},
        ),
        "victim",
    )
    await intruder.send(
        {
            "type": "register",
            "protocol": 1,
            "id": "victim",
            "queues": ["q"],
            "capacity": {"cpus": 1},
            "held": [{"runId": assign["runId"], "fence": assign["fence"]}],
        }
    )
    assert "belongs to a worker of other queues" in (await intruder.expect("error"))["error"]
    # The victim keeps its run and its session.
    assert (await victim.result(assign["runId"], assign["fence"]))["type"] == "accepted"
    result = body(await fetch("q", "other", "j", answer["jobId"], "result.json"))
    assert result["worker"]["id"] == "victim" and result["lostCount"] == 0


@pytest.mark.parametrize("cq_config", [{"public": True}])
async def test_public_status_hides_other_queues(
    fetch: Fetch, jp_ws_fetch: WsFetch, jp_http_port: int, jp_base_url: str
) -> None:
    worker, _ = await Worker.connect(jp_ws_fetch, "w1", queues=("pub", "secret-name"), cpus=2)
    await fetch("q", "secret-name", method="POST", json=JOB)
    await fetch("q", "pub", method="POST", json=job(1))
    await worker.expect("assign")
    await worker.expect("assign")
    from tornado.httpclient import AsyncHTTPClient

    url = f"http://127.0.0.1:{jp_http_port}{jp_base_url}compute-queue/q/pub/status"
    response = await AsyncHTTPClient().fetch(url)  # no credentials
    text = response.body.decode()
    assert "secret-name" not in text
    [seen] = body(response)["workers"]
    assert seen["queues"] == ["pub"] and len(seen["running"]) == 1


async def test_badly_typed_registrations_get_errors(jp_ws_fetch: WsFetch) -> None:
    raw = Worker(await jp_ws_fetch("compute-queue", "worker"), "x")
    base = {"type": "register", "protocol": 1, "id": "x", "capacity": {"cpus": 1}}
    for bad in ({"queues": [5]}, {"queues": ["q"], "tags": [[1]]}, {"queues": ["q"], "held": [5]}):
        await raw.send({**base, **bad})
        assert (await raw.expect("error"))["error"], bad
    await raw.send({**base, "queues": ["q"]})
    await raw.expect("registered")
