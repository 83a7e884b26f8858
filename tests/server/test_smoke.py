from __future__ import annotations

from .conftest import Fetch, body

JOB = {"image": "busybox", "command": "echo hi"}


async def test_submit_and_read(fetch: Fetch) -> None:
    r = await fetch("healthz")
    assert r.code == 200 and body(r) == {"ok": True}
    r = await fetch("q", "demo", method="POST", json=JOB)
    assert r.code == 200, r.body
    answer = body(r)
    assert answer["url"].endswith(f"/cq-base/compute-queue/q/demo/j/{answer['jobId']}")
    r = await fetch("j", answer["jobId"])
    assert r.code == 200 and body(r)["definition"] == JOB
    r = await fetch("q", "demo", "j", answer["jobId"], "result.json")
    assert body(r)["state"] == "Queued"
    r = await fetch("nothing", "here")
    assert r.code == 404 and "no route" in body(r)["error"]
