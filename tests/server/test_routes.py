"""Every REST route on a real Jupyter server under a non-root base URL."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import zipfile
from typing import Any

import pytest

from jupyter_compute_queue.host.service import QueueService
from jupyter_compute_queue.host.store.base import Outcome, WorkerInfo
from jupyter_compute_queue.model.capacity import Capacity
from jupyter_compute_queue.model.runs import OutputRef, Reason

from ..conftest import USER, ScriptedWorker
from .conftest import Fetch, body

JOB = {"image": "busybox", "command": "echo hi"}
SAFE = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "sandbox; default-src 'none'",
}


@pytest.fixture
async def service(jp_serverapp: Any) -> QueueService:
    """The host's own service, to play a worker through its Python API."""
    return await jp_serverapp.web_app.settings["compute_queue"].ready()  # type: ignore[no-any-return]


async def run_to_end(service: QueueService, outputs: dict[str, bytes], log: str = "") -> str:
    """Let a scripted worker take the next queued run and finish it with these outputs."""
    worker = ScriptedWorker(WorkerInfo("w", ("q",), Capacity(1)))
    await service.connect_worker(USER, worker.info, [], worker.deliver, worker.stop)
    await service.report_free("w", worker.info.capacity)
    [assignment] = worker.assigned
    run_id = assignment.record.run_id
    refs = {}
    for path, data in outputs.items():
        key = hashlib.sha256(data).hexdigest()
        await service.blobs.put(key, data)
        refs[path] = OutputRef(key=key, size=len(data))
    if log:
        service.append_logs("w", run_id, assignment.fence, [("out", log, None)])
    await service.finish("w", run_id, assignment.fence, Outcome(Reason.SUCCESS, 0, outputs=refs))
    await service.disconnect_worker("w", graceful=True)
    return run_id


def assert_attachment(response: Any, filename: str, content_type: str) -> None:
    for name, value in SAFE.items():
        assert response.headers[name] == value, name
    assert response.headers["Content-Disposition"].startswith("attachment;")
    assert filename in response.headers["Content-Disposition"]
    assert response.headers["Content-Type"] == content_type


async def test_submit_batch_and_errors(fetch: Fetch) -> None:
    r = await fetch("q", "q", "j", method="POST", json=[JOB, {"definition": {"image": "x"}}])
    assert r.code == 200 and [a["state"] for a in body(r)] == ["Queued", "Queued"]
    r = await fetch("q", "q", method="POST", json={"image": "x", "shmSize": "huge"})
    assert r.code == 400 and body(r)["error"].startswith("shmSize: ")
    r = await fetch("q", "q", method="POST", body=b"{not json")
    assert r.code == 400 and "not valid JSON" in body(r)["error"]
    big = {"image": "x", "env": {"BIG": "x" * (4 * 1024 * 1024 + 1)}}
    r = await fetch("q", "q", method="POST", json=big)
    assert r.code == 413 and "definition" in body(r)["error"]
    r = await fetch("q", "bad%20name", method="POST", json=JOB)
    assert r.code == 400 and "queue name" in body(r)["error"]
    r = await fetch("j", "ABC")
    assert r.code == 400 and "64 lowercase hex" in body(r)["error"]
    r = await fetch("j", "0" * 64)
    assert r.code == 404 and "not known" in body(r)["error"]


async def test_blob_put_get_and_bad_hash(fetch: Fetch) -> None:
    data = b"some bytes" * 1000
    key = hashlib.sha256(data).hexdigest()
    wrong = hashlib.sha256(b"other").hexdigest()
    r = await fetch("f", wrong, method="PUT", body=data)
    assert r.code == 400 and "hash" in body(r)["error"]
    assert (await fetch("f", wrong, "exists")).code == 404
    assert (await fetch("f", wrong, method="HEAD")).code == 404
    r = await fetch("f", key, method="PUT", body=data)
    assert r.code == 201 and body(r) == {"key": key, "size": len(data)}
    assert (await fetch("f", key, "exists")).code == 200
    r = await fetch("f", key)
    assert r.code == 200 and r.body == data
    assert_attachment(r, key, "application/octet-stream")
    r = await fetch("f", key, method="HEAD")
    assert r.code == 200 and r.headers["Content-Length"] == str(len(data))
    r = await fetch("f", "../../etc/passwd", method="PUT", body=b"x")
    assert r.code in (400, 404)


@pytest.mark.parametrize("cq_config", [{"max_blob_bytes": 1000}])
async def test_blob_over_the_limit(fetch: Fetch, service: QueueService) -> None:
    data = b"x" * 5000
    key = hashlib.sha256(data).hexdigest()
    r = await fetch("f", key, method="PUT", body=data)
    assert r.code == 413 and "limit" in body(r)["error"]
    assert not await service.blobs.exists(key)


async def test_inputs_are_attachments_never_rendered(fetch: Fetch) -> None:
    html = "<script>alert(1)</script>"
    definition = {
        "image": "x",
        "inputs": {
            "page.html": {"type": "utf8", "value": html},
            "d/data.csv": {"type": "utf8", "value": "a,b\n1,2\n"},
            "pic.svg": {"type": "utf8", "value": "<svg onload='alert(1)'/>"},
            "remote": {"type": "url", "value": "https://example.org/x"},
        },
    }
    job = body(await fetch("q", "q", method="POST", json=definition))["jobId"]
    r = await fetch("q", "q", "j", job, "inputs", "page.html")
    assert r.body.decode() == html
    assert_attachment(r, "page.html", "application/octet-stream")
    r = await fetch("j", job, "inputs", "d", "data.csv")
    assert_attachment(r, "data.csv", "text/csv; charset=utf-8")
    r = await fetch("j", job, "inputs", "pic.svg")
    assert_attachment(r, "pic.svg", "application/octet-stream")
    r = await fetch("j", job, "inputs", "remote")
    assert r.code == 307 and r.headers["Location"] == "https://example.org/x"
    r = await fetch("j", job, "inputs", "missing.txt")
    assert r.code == 404 and "no input" in body(r)["error"]


async def test_outputs_logs_zip_and_parts(fetch: Fetch, service: QueueService) -> None:
    job = body(await fetch("q", "q", method="POST", json=JOB))["jobId"]
    r = await fetch("q", "q", "j", job, "outputs.zip")
    assert r.code == 404
    outputs = {
        "report.html": b"<html><script>alert(1)</script></html>",
        "img/plot.svg": b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        "img/plot.png": b"\x89PNG\r\n\x1a\nfake",
    }
    run_id = await run_to_end(service, outputs, log="line one\nline two\n")
    r = await fetch("q", "q", "j", job, "outputs", "report.html")
    assert r.body == outputs["report.html"]
    assert_attachment(r, "report.html", "application/octet-stream")
    r = await fetch("j", job, "outputs", "img", "plot.svg")
    assert_attachment(r, "plot.svg", "application/octet-stream")
    r = await fetch("j", job, "outputs", "img", "plot.png")
    assert_attachment(r, "plot.png", "image/png")
    r = await fetch("q", "q", "j", job, "outputs.zip")
    assert_attachment(r, "outputs.zip", "application/zip")
    with zipfile.ZipFile(io.BytesIO(r.body)) as archive:
        assert {n: archive.read(n) for n in archive.namelist()} == outputs

    r = await fetch("q", "q", "j", job, "result.json")
    result = body(r)
    assert result["runId"] == run_id and result["reason"] == "Success"
    assert result["outputs"]["img/plot.png"]["size"] == len(outputs["img/plot.png"])
    assert body(await fetch("q", "q", "j", job, "definition.json")) == JOB
    assert body(await fetch("q", "q", "j", job, "namespaces.json")) == ["_"]

    r = await fetch("j", job, "logs")
    assert r.body == b"line one\nline two\n"
    assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    r = await fetch("j", job, "logs", params={"since": "9"})
    assert r.body == b"line two\n"
    r = await fetch("j", job, "logs", params={"format": "jsonl"})
    [record] = [json.loads(line) for line in r.body.splitlines()]
    assert record["o"] == 0 and record["s"] == "out" and record["d"] == "line one\nline two\n"
    r = await fetch("j", job, "logs", params={"format": "html"})
    assert r.code == 400
    r = await fetch("j", job, "logs", params={"run": "nope"})
    assert r.code == 404


async def test_cancel_forget_copy_status_and_listing(fetch: Fetch, service: QueueService) -> None:
    first = body(await fetch("q", "q", method="POST", json=JOB))
    job = first["jobId"]
    r = await fetch("q", "q", "j", job, "cancel", method="POST", body=b"")
    assert body(r)["changed"] is True and body(r)["runs"][0]["reason"] == "Cancelled"
    r = await fetch("j", job, "cancel", method="POST", body=b"")
    assert body(r)["changed"] is False and "nothing to cancel" in body(r)["message"]

    again = body(await fetch("q", "q", method="POST", json=JOB))
    await run_to_end(service, {})
    assert body(await fetch("q", "q", method="POST", json=JOB))["cached"] is True
    r = await fetch("q", "q", "j", job, method="DELETE")
    assert body(r)["forgotten"] == 1
    assert body(await fetch("q", "q", method="POST", json=JOB))["cached"] is False

    r = await fetch("j", job, "copy", method="POST", json={"queue": "other"})
    assert r.code == 200 and body(r)["queue"] == "other" and body(r)["jobId"] == job
    r = await fetch("j", job, "copy", method="POST", json={"nope": 1})
    assert r.code == 400 and "queue" in body(r)["error"]

    status = body(await fetch("q", "q", "status"))
    assert status["counts"] == {"Queued": 1, "Running": 0, "Finished": 2}
    runs, cursor = [], None
    while True:
        params = {"limit": "1", **({"cursor": cursor} if cursor else {})}
        page = body(await fetch("q", "q", params=params))
        runs += [r["runId"] for r in page["runs"]]
        cursor = page["cursor"]
        if cursor is None:
            break
    assert len(runs) == 3 and runs[-1] == first["runId"] and again["runId"] in runs
    page = body(await fetch("q", "q", "j", params={"state": "Finished"}))
    assert {r["state"] for r in page["runs"]} == {"Finished"}
    r = await fetch("q", "q", params={"state": "Lost"})
    assert r.code == 400


@pytest.mark.parametrize("cq_config", [{"lease_seconds": 0.6}])
async def test_sweeper_runs_in_the_server_and_activity_is_reported(
    fetch: Fetch, service: QueueService, jp_serverapp: Any
) -> None:
    app = jp_serverapp.web_app.settings["compute_queue"]
    assert app.current_activity() is False
    job = body(await fetch("q", "q", method="POST", json=JOB))["jobId"]
    assert app.current_activity() is True
    worker = ScriptedWorker(WorkerInfo("silent", ("q",), Capacity(1)))
    await service.connect_worker(USER, worker.info, [], worker.deliver, worker.stop)
    await service.report_free("silent", worker.info.capacity)
    assert body(await fetch("q", "q", "j", job, "result.json"))["state"] == "Running"
    # The worker never heart-beats: the server's own lease sweeper must requeue the run.
    deadline = asyncio.get_running_loop().time() + 15
    while body(await fetch("q", "q", "j", job, "result.json"))["state"] != "Queued":
        assert asyncio.get_running_loop().time() < deadline, "the lease sweeper did not run"
        await asyncio.sleep(0.05)
    await fetch("q", "q", "j", job, "cancel", method="POST", body=b"")
    assert app.current_activity() is False


async def test_base64_inputs_in_either_alphabet(fetch: Fetch) -> None:
    data = bytes(range(250, 256)) * 3  # '+' and '/' in one alphabet, '-' and '_' in the other
    definition = {
        "image": "x",
        "inputs": {
            "std.bin": {"type": "base64", "value": base64.b64encode(data).decode()},
            "url.bin": {"type": "base64", "value": base64.urlsafe_b64encode(data).decode()},
        },
    }
    job = body(await fetch("q", "q", method="POST", json=definition))["jobId"]
    for name in ("std.bin", "url.bin"):
        r = await fetch("j", job, "inputs", name)
        assert r.code == 200 and r.body == data, name


async def test_outputs_survive_a_cancelled_rerun(fetch: Fetch, service: QueueService) -> None:
    job = body(await fetch("q", "q", method="POST", json=JOB))["jobId"]
    run_id = await run_to_end(service, {"out.txt": b"first result"})
    rerun = body(await fetch("q", "q", method="POST", json={"definition": JOB, "rerun": True}))
    await fetch("q", "q", "j", job, "cancel", method="POST", body=b"")
    assert rerun["runId"] != run_id
    r = await fetch("q", "q", "j", job, "outputs", "out.txt")
    assert r.code == 200 and r.body == b"first result"
    r = await fetch("q", "q", "j", job, "outputs", "out.txt", params={"run": rerun["runId"]})
    assert r.code == 404
