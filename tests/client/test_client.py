"""The Python client against a real host, a real in-process worker and Docker.

The host runs on the test's event loop, so every blocking client call goes through
``asyncio.to_thread`` (which is also how a kernel's comm handlers would call it). Discovery is
tested with fake runtime files in a temporary ``JUPYTER_RUNTIME_DIR`` that point at the real
test server, so a wrong choice fails a real request; and end to end, with two real Jupyter
servers as subprocesses and a kernel started by each, over the servers' own runtime files.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
from jupyter_client.blocking.client import BlockingKernelClient

from jupyter_compute_queue.client.client import (
    INLINE_LIMIT,
    Client,
    ComputeQueueError,
    HostNotFound,
    Job,
    JobTimeout,
    LogRecord,
)
from jupyter_compute_queue.model.jobs import job_id, parse_definition
from jupyter_compute_queue.worker.docker_runner import LABEL_WORKER
from tests.docker_env import free_loopback_port

from .conftest import Fetch, StartWorker, body

T = TypeVar("T")


async def run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A blocking client call off the loop the host runs on."""
    return await asyncio.to_thread(fn, *args, **kwargs)


@pytest.fixture
def server_url(jp_http_port: int, jp_base_url: str, host_token: str, fetch: Fetch) -> str:
    """The test server's URL with its base URL, as COMPUTE_QUEUE_URL takes it (``fetch`` makes
    the server listen)."""
    return f"http://127.0.0.1:{jp_http_port}{jp_base_url}"


@pytest.fixture
def client(server_url: str, host_token: str) -> Client:
    return Client(server_url, host_token, queue="q")


@pytest.fixture(scope="module")
def wid(docker_engine: Any) -> Iterator[str]:
    """The worker id of this module's tests. Not ``w1``: other test sessions on the same Docker
    engine remove the containers of their workers by id when they end. One id for the module,
    so one worker network, removed at the end."""
    worker = f"client-{uuid.uuid4().hex[:8]}"
    yield worker
    for network in docker_engine.networks.list(filters={"label": f"{LABEL_WORKER}={worker}"}):
        with contextlib.suppress(Exception):
            network.remove()


def busybox(command: str | list[str], **fields: Any) -> dict[str, Any]:
    return {"image": "cq-test/busybox:1", "command": command, **fields}


async def until_running(job: Job, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (await run(job.refresh)).state != "Running":
        assert time.monotonic() < deadline, f"not running within {timeout}s: {job}"
        await asyncio.sleep(0.05)


# --- jobs ------------------------------------------------------------------------------------


async def test_submit_wait_logs_and_outputs(
    client: Client, start_worker: StartWorker, wid: str, test_images: Any, tmp_path: Path
) -> None:
    await start_worker(wid)
    script = (
        "echo hello from the job; echo a warning >&2; mkdir -p /outputs/sub; "
        "echo top > /outputs/top.txt; printf nested > /outputs/sub/n.txt; "
        "head -c 100000 /dev/zero > /outputs/zeros.bin"
    )
    definition = busybox(["sh", "-c", script])
    job = await run(client.submit, definition)
    assert job.job_id == job_id(definition) and job.queue == "q" and not job.cached
    assert job.url.endswith(f"/cq-base/compute-queue/q/q/j/{job.job_id}")
    assert job.state in ("Queued", "Running")

    assert await run(job.wait, 60) is job
    assert (job.state, job.reason, job.exit_code, job.phase) == ("Finished", "Success", 0, None)
    assert job.record is not None and job.record.run_id == job.run_id

    text = await run(job.logs)
    assert "hello from the job\n" in text and "a warning\n" in text
    records = await run(job.log_records)
    assert all(isinstance(r, LogRecord) for r in records)
    assert "".join(r.d for r in records) == text
    kinds = {r.d: r.s for r in records}
    assert kinds["hello from the job\n"] == "out" and kinds["a warning\n"] == "err"
    offset = records[-1].o
    assert await run(job.logs, offset) == text.encode()[offset:].decode()

    assert job.outputs == {
        "top.txt": {"key": hashlib.sha256(b"top\n").hexdigest(), "size": 4},
        "sub/n.txt": {"key": hashlib.sha256(b"nested").hexdigest(), "size": 6},
        "zeros.bin": {"key": hashlib.sha256(bytes(100000)).hexdigest(), "size": 100000},
    }
    assert await run(job.read_output, "sub/n.txt") == b"nested"
    with pytest.raises(ValueError, match="max_bytes"):
        await run(job.read_output, "zeros.bin", max_bytes=1000)
    with pytest.raises(ComputeQueueError, match="no output 'nope'") as missing:
        await run(job.read_output, "nope")
    assert missing.value.status == 404

    written = await run(job.download, tmp_path / "out")
    assert written == {
        "top.txt": tmp_path / "out" / "top.txt",
        "sub/n.txt": tmp_path / "out" / "sub" / "n.txt",
        "zeros.bin": tmp_path / "out" / "zeros.bin",
    }
    assert (tmp_path / "out" / "sub" / "n.txt").read_bytes() == b"nested"
    assert (tmp_path / "out" / "zeros.bin").read_bytes() == bytes(100000)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["sub", "top.txt", "zeros.bin"]

    archive = await run(job.download_zip, tmp_path)
    assert archive == tmp_path / f"{job.job_id[:12]}-outputs.zip"
    with zipfile.ZipFile(archive) as zipped:
        assert sorted(zipped.namelist()) == ["sub/n.txt", "top.txt", "zeros.bin"]
        assert zipped.read("top.txt") == b"top\n"

    again = await run(client.submit, definition)
    assert again.cached and again.run_id == job.run_id
    assert again.reason == "Success" and again.outputs == job.outputs  # the record came along


async def test_a_live_log_arrives_before_the_job_ends(
    client: Client, start_worker: StartWorker, wid: str, test_images: Any
) -> None:
    await start_worker(wid)
    job = await run(
        client.submit,
        busybox("for i in 1 2 3 4 5 6 7 8 9 10; do echo line $i; sleep 0.2; done"),
    )

    def follow() -> tuple[list[LogRecord], str | None, int]:
        seen: list[LogRecord] = []
        state_at_first_line = None
        with job.stream_logs(timeout=60) as stream:
            for record in stream:
                if record.d.startswith("line") and state_at_first_line is None:
                    state_at_first_line = job.refresh().state  # asked over REST
                seen.append(record)
            return seen, state_at_first_line, stream.next

    seen, state_at_first_line, end = await run(follow)
    assert state_at_first_line == "Running"
    text = "".join(r.d for r in seen)
    assert [x for x in text.splitlines() if x.startswith("line")] == [
        f"line {i}" for i in range(1, 11)
    ]
    assert (await run(job.refresh)).finished
    assert text == await run(job.logs)
    assert end == len(text.encode())

    # Resuming from an offset gives exactly the rest, also for a finished run.
    middle = seen[len(seen) // 2].o
    rest = await run(lambda: "".join(job.stream_logs(since=middle).text()))
    assert rest == text.encode()[middle:].decode()


async def test_a_dropped_websocket_resumes_from_its_offset(
    client: Client, start_worker: StartWorker, wid: str, test_images: Any
) -> None:
    await start_worker(wid)
    job = await run(
        client.submit, busybox("for i in 1 2 3 4 5 6 7 8; do echo drop $i; sleep 0.2; done")
    )

    def follow() -> tuple[str, int]:
        parts: list[str] = []
        stream = job.stream_logs(timeout=60)
        sock = stream._socket
        assert sock is not None
        dropped = False
        for record in stream:
            parts.append(record.d)
            if record.d.startswith("drop") and not dropped:
                dropped = True
                assert sock._loop is not None
                sock._loop.call_soon_threadsafe(sock._close_conn)  # as if the network dropped
        return "".join(parts), sock.connections

    text, connections = await run(follow)
    assert connections == 2  # it reconnected rather than falling back to polling
    assert text == await run(job.logs)  # nothing lost, nothing twice
    assert [x for x in text.splitlines() if x.startswith("drop")] == [
        f"drop {i}" for i in range(1, 9)
    ]


async def test_without_a_websocket_it_polls(
    client: Client,
    start_worker: StartWorker,
    wid: str,
    test_images: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setattr(client, "_ws_url", lambda queue: f"ws://127.0.0.1:{port}/nothing")
    await start_worker(wid)
    job = await run(client.submit, busybox("for i in 1 2 3; do echo poll $i; sleep 0.2; done"))
    text = await run(lambda: "".join(job.stream_logs(timeout=60, poll=0.2).text()))
    assert [x for x in text.splitlines() if x.startswith("poll")] == ["poll 1", "poll 2", "poll 3"]
    assert text == await run(job.logs)
    other = await run(client.submit, busybox(["sleep", "1"]))
    assert (await run(other.wait, 60, 0.2)).reason == "Success"


async def test_cancel_and_timeout(
    client: Client, start_worker: StartWorker, wid: str, test_images: Any
) -> None:
    await start_worker(wid)
    job = await run(client.submit, busybox(["sleep", "60"]))
    with pytest.raises(JobTimeout, match=r"did not finish within 0\.5 s") as timed_out:
        await run(job.wait, 0.5)
    assert isinstance(timed_out.value, TimeoutError)
    await until_running(job)

    started = time.monotonic()
    waiter = asyncio.ensure_future(run(job.wait, 30))  # another thread, on the websocket
    await asyncio.sleep(0.3)
    answer = await run(job.cancel)
    assert answer["changed"] is True and answer["message"] == "cancelled"
    waited = await waiter
    assert waited.reason == "Cancelled" and job.finished
    assert time.monotonic() - started < 15
    again = await run(job.cancel)
    assert again["changed"] is False and "nothing to cancel" in again["message"]


async def test_cancel_as_a_holder_lets_go(client: Client) -> None:
    definition = busybox(["sleep", "60"])  # no worker serves q2: the run stays queued
    first = await run(client.submit, definition, "q2", "holder-a")
    second = await run(client.submit, definition, "q2", "holder-b")
    assert second.run_id == first.run_id
    answer = await run(first.cancel, "holder-a")
    assert answer["changed"] is True
    assert (await run(first.refresh)).state == "Queued"
    assert first.record is not None and first.record.namespaces == ["holder-b"]
    await run(second.cancel, "holder-b")
    assert second.reason == "Cancelled"
    assert (await run(first.refresh)).reason == "Cancelled"


# --- files and blobs -------------------------------------------------------------------------


async def test_a_large_file_goes_as_a_blob_once(
    client: Client, start_worker: StartWorker, wid: str, test_images: Any, tmp_path: Path
) -> None:
    await start_worker(wid)
    data = os.urandom(200_000)
    assert len(data) > INLINE_LIMIT
    key = hashlib.sha256(data).hexdigest()
    big = tmp_path / "big.bin"
    big.write_bytes(data)
    folder = tmp_path / "folder"
    (folder / "deep").mkdir(parents=True)
    (folder / "deep" / "x.txt").write_text("in a folder\n")
    assert not await run(client.has_blob, key)

    calls: list[tuple[int, int]] = []
    job = await run(
        partial(
            client.submit,
            busybox("sha256sum /inputs/big.bin; cat /inputs/small.txt /inputs/dir/deep/x.txt"),
            files={"big.bin": big, "small.txt": b"small\n", "dir": folder},
            progress=lambda done, total: calls.append((done, total)),
        )
    )
    assert calls and calls[-1] == (200_000, 200_000)
    assert all(total == 200_000 for _, total in calls)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    stored = await run(job.definition)
    assert stored["inputs"] == {
        "big.bin": {"type": "key", "value": key},
        "small.txt": {"type": "utf8", "value": "small\n"},
        "dir/deep/x.txt": {"type": "utf8", "value": "in a folder\n"},
    }
    assert await run(client.has_blob, key)
    await run(job.wait, 60)
    text = await run(job.logs)
    assert job.reason == "Success", text
    assert f"{key}  /inputs/big.bin" in text and "small\nin a folder\n" in text

    # The same file again (another job): the host has it, nothing is uploaded.
    again: list[tuple[int, int]] = []
    second = await run(
        partial(
            client.submit,
            busybox("wc -c /inputs/big.bin"),
            files={"big.bin": str(big)},
            progress=lambda done, total: again.append((done, total)),
        )
    )
    assert again == []
    assert (await run(second.definition))["inputs"]["big.bin"] == {"type": "key", "value": key}

    # An inline ref over the limit in a definition is sent as a blob too; same job id.
    inline = busybox(
        "wc -c /inputs/t.txt", inputs={"t.txt": {"type": "utf8", "value": "x" * 70_000}}
    )
    third = await run(client.submit, inline, "q2")
    assert third.job_id == job_id(inline)
    ref = (await run(third.definition))["inputs"]["t.txt"]
    assert ref == {"type": "key", "value": hashlib.sha256(b"x" * 70_000).hexdigest()}

    with pytest.raises(ValueError, match=r"inputs\.a: given both"):
        await run(
            client.submit,
            busybox("true", inputs={"a": {"type": "utf8", "value": "1"}}),
            files={"a": b"2"},
        )


# --- batches, attach, errors, threads --------------------------------------------------------


async def test_batch_submit(
    client: Client, start_worker: StartWorker, wid: str, test_images: Any
) -> None:
    await start_worker(wid, cpus=3)
    jobs = await run(
        client.submit_batch,
        [
            busybox(["echo", "batch 0"]),
            {"definition": busybox(["echo", "batch 1"]), "namespace": "batch-one"},
            {"definition": busybox(["cat", "/inputs/f.txt"]), "files": {"f.txt": b"batch 2\n"}},
        ],
    )
    assert len(jobs) == 3 and len({j.job_id for j in jobs}) == 3
    assert [j.namespace for j in jobs] == [None, "batch-one", None]
    for i, job in enumerate(jobs):
        await run(job.wait, 60)
        assert job.reason == "Success"
        assert f"batch {i}\n" in await run(job.logs)
    assert jobs[1].record is not None and jobs[1].record.namespaces == ["batch-one"]
    assert await run(client.submit_batch, []) == []


async def test_a_batch_over_the_hosts_max_batch_size_goes_in_parts(
    server_url: str, host_token: str
) -> None:
    """The host takes at most max_batch_size (1000) per request: a batch of 1,201 still goes
    through, in order (no worker: the runs stay queued)."""
    client = Client(server_url, host_token, queue="big-batch")
    definitions = [{"image": "busybox", "command": ["echo", str(i)]} for i in range(1201)]
    jobs = await run(client.submit_batch, definitions)
    assert len(jobs) == 1201
    assert [j.job_id for j in jobs] == [job_id(parse_definition(d)) for d in definitions]
    assert all(j.state == "Queued" for j in jobs)


async def test_attach_from_a_fresh_client_and_another_process(
    client: Client,
    start_worker: StartWorker,
    wid: str,
    test_images: Any,
    server_url: str,
    host_token: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await start_worker(wid)
    job = await run(client.submit, busybox("echo attach me > /outputs/o.txt; echo logged"))
    await run(job.wait, 60)

    fresh = Client(server_url, host_token, queue="elsewhere")
    attached = await run(Job.attach, job.job_id, "q", fresh)
    assert (attached.run_id, attached.queue, attached.url) == (job.run_id, "q", job.url)
    assert (attached.state, attached.reason) == ("Finished", "Success")
    assert await run(attached.logs) == await run(job.logs)
    assert await run(attached.read_output, "o.txt") == b"attach me\n"
    anywhere = await run(fresh.job, job.job_id)  # every queue the caller may see
    assert anywhere.queue == "q" and anywhere.run_id == job.run_id
    with pytest.raises(ComputeQueueError, match="has no run") as none:
        await run(Job.attach, job.job_id, "q", fresh, "0" * 32)
    assert none.value.status == 404

    env = {**os.environ, "COMPUTE_QUEUE_URL": server_url, "COMPUTE_QUEUE_TOKEN": host_token}
    script = (
        "import json, sys\n"
        "from jupyter_compute_queue.client import Job\n"
        "job = Job.attach(sys.argv[1], 'q').wait(30)\n"
        "out = job.read_output('o.txt').decode()\n"
        "print(json.dumps([job.run_id, job.reason, job.logs(), out]))\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        job.job_id,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    assert json.loads(out) == [job.run_id, "Success", await run(job.logs), "attach me\n"]


async def test_errors_carry_the_hosts_message(
    client: Client, fetch: Fetch, server_url: str
) -> None:
    bad = busybox("true", bogus=1)
    with pytest.raises(ComputeQueueError) as refused:
        await run(client.submit, bad)
    host = await fetch("q", "q", method="POST", json={"definition": bad})
    assert refused.value.status == host.code == 400
    assert refused.value.message == body(host)["error"] and "bogus" in refused.value.message
    assert refused.value.message in str(refused.value)

    # A lone surrogate (no UTF-8 encoder takes it) still reaches the host, which names it.
    with pytest.raises(
        ComputeQueueError, match=r"definition\.env\.A: holds a lone UTF-16 surrogate"
    ) as surrogate:
        await run(client.submit, busybox("true", env={"A": "\ud800"}))
    assert surrogate.value.status == 400

    with pytest.raises(ComputeQueueError) as bad_queue:
        await run(client.submit, busybox("true"), "not a queue!")
    assert bad_queue.value.status == 400 and "not a queue!" in bad_queue.value.message

    unknown = "f" * 64
    with pytest.raises(ComputeQueueError) as missing:
        await run(Job.attach, unknown, "q", client)
    host = await fetch("q", "q", "j", unknown)
    assert missing.value.status == host.code == 404
    assert missing.value.message == body(host)["error"]

    stranger = Client(server_url, "not-the-token", queue="q")
    with pytest.raises(ComputeQueueError, match="send a Jupyter token") as unauthorised:
        await run(stranger.status)
    assert unauthorised.value.status == 401

    nobody = Client("http://127.0.0.1:9/", queue="q", timeout=5)
    with pytest.raises(ComputeQueueError, match="cannot reach the host") as unreachable:
        await run(nobody.status)
    assert unreachable.value.status is None


async def test_one_client_from_many_threads(
    client: Client, start_worker: StartWorker, wid: str, test_images: Any
) -> None:
    await start_worker(wid, cpus=4)

    def one(i: int) -> tuple[str, str, str, bytes]:
        job = client.submit(busybox(f"echo thread {i}; echo {i} > /outputs/i.txt"))
        streamed = "".join(job.stream_logs(timeout=60).text())
        job.wait(60)
        return job.reason or "", streamed, job.logs(), job.read_output("i.txt")

    def all_at_once() -> list[tuple[str, str, str, bytes]]:
        with ThreadPoolExecutor(6) as pool:
            return list(pool.map(one, range(6)))

    for i, (reason, streamed, stored, output) in enumerate(await run(all_at_once)):
        assert reason == "Success" and streamed == stored
        assert f"thread {i}\n" in stored and output == f"{i}\n".encode()


# --- discovery -------------------------------------------------------------------------------


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty runtime dir and none of the discovery variables set."""
    for name in (
        "COMPUTE_QUEUE_URL",
        "COMPUTE_QUEUE_TOKEN",
        "JUPYTERHUB_API_TOKEN",
        "JUPYTERHUB_SERVICE_URL",
        "JPY_PARENT_PID",
    ):
        monkeypatch.delenv(name, raising=False)
    folder = tmp_path / "runtime"
    folder.mkdir()
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(folder))
    return folder


@pytest.fixture
def other_pid() -> Iterator[int]:
    """A running process that is not an ancestor of this one."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield process.pid
    finally:
        process.kill()
        process.wait()


@pytest.fixture
def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


BOGUS = "http://127.0.0.1:9/bogus/"


def server_file(folder: Path, name: str, pid: int, url: str, token: str, root: str) -> Path:
    path = folder / f"jpserver-{name}.json"
    path.write_text(
        json.dumps(
            {"url": url, "token": token, "pid": pid, "root_dir": root, "sock": "", "secure": False}
        )
    )
    return path


async def test_discovery_picks_the_server_that_is_the_parent(
    runtime: Path, other_pid: int, server_url: str, host_token: str, tmp_path: Path
) -> None:
    # The other server's root holds the working folder, this one's does not: the pid wins.
    elsewhere = str(tmp_path / "elsewhere")
    real = server_file(runtime, str(os.getppid()), os.getppid(), server_url, host_token, elsewhere)
    server_file(runtime, str(other_pid), other_pid, BOGUS, "wrong", "/")
    client = Client(queue="q")
    assert (client.url, client.token) == (server_url, host_token)
    assert str(real) in client.host.source and "parent" in client.host.source
    assert (await run(client.status))["queue"] == "q"


async def test_discovery_falls_back_to_the_root_that_holds_the_kernel(
    runtime: Path,
    other_pid: int,
    dead_pid: int,
    server_url: str,
    host_token: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    work = tmp_path / "work"
    (work / "notebooks").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(work / "notebooks")
    real = server_file(runtime, "a", other_pid, server_url, host_token, str(work))
    server_file(runtime, "b", other_pid, BOGUS, "wrong", str(tmp_path))  # contains it, less deep
    server_file(runtime, "c", other_pid, BOGUS, "wrong", str(tmp_path / "other"))
    server_file(runtime, "d", dead_pid, BOGUS, "wrong", str(work / "notebooks"))  # not running
    client = Client(queue="q")
    assert (client.url, client.token) == (server_url, host_token)
    assert str(real) in client.host.source and "root" in client.host.source
    assert (await run(client.status))["queue"] == "q"


async def test_discovery_from_environment_variables(
    runtime: Path, server_url: str, host_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    server_file(runtime, "parent", os.getppid(), BOGUS, "wrong", "/")
    monkeypatch.setenv("COMPUTE_QUEUE_URL", server_url)
    monkeypatch.setenv("COMPUTE_QUEUE_TOKEN", host_token)
    client = Client(queue="q")
    assert client.api_url == server_url + "compute-queue/" and client.token == host_token
    assert client.host.source == "$COMPUTE_QUEUE_URL"
    assert (await run(client.status))["queue"] == "q"

    monkeypatch.setenv("COMPUTE_QUEUE_URL", server_url + "compute-queue")  # the API URL works
    assert Client().api_url == server_url + "compute-queue/"
    # A URL given explicitly never gets the environment's token.
    explicit = Client(BOGUS)
    assert explicit.url == BOGUS and explicit.token is None
    assert Client(f"{server_url}?token=abc").token == "abc"


async def test_discovery_under_jupyterhub_uses_the_hub_token(
    runtime: Path, server_url: str, host_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", host_token)
    server_file(runtime, "hub", os.getppid(), server_url, "", "/")
    client = Client(queue="q")
    assert client.token == host_token and "JUPYTERHUB_API_TOKEN" in client.host.source
    assert (await run(client.status))["queue"] == "q"

    (runtime / "jpserver-hub.json").unlink()
    monkeypatch.setenv("JUPYTERHUB_SERVICE_URL", server_url)
    client = Client(queue="q")
    assert (client.url, client.token) == (server_url, host_token)
    assert (await run(client.status))["queue"] == "q"


def test_no_host_found_lists_what_was_tried(
    runtime: Path, other_pid: int, dead_pid: int, tmp_path: Path
) -> None:
    server_file(runtime, "stale", dead_pid, BOGUS, "t", "/")
    server_file(runtime, "elsewhere", other_pid, BOGUS, "t", str(tmp_path / "nowhere"))
    with pytest.raises(HostNotFound) as error:
        Client()
    message = str(error.value)
    assert len(error.value.tried) == 4
    for expected in (
        "Client(url=…): not given",
        "$COMPUTE_QUEUE_URL: not set",
        f"Jupyter runtime files in {runtime}",
        f"jpserver-stale.json: server pid {dead_pid} is not running",
        f"jpserver-elsewhere.json: pid {other_pid} is not an ancestor",
        "$JUPYTERHUB_SERVICE_URL (JupyterHub): not set",
        "COMPUTE_QUEUE_TOKEN",
    ):
        assert expected in message, (expected, message)


async def test_a_server_file_without_a_token_says_so_on_a_401(
    runtime: Path, server_url: str
) -> None:
    # A server with a password login writes no token: the request goes without one, and the
    # refusal says why and what to do instead of a bare 401.
    path = server_file(runtime, "password", os.getppid(), server_url, "", "/")
    client = Client(queue="q")
    assert client.token is None and client.host.server_file == path
    with pytest.raises(ComputeQueueError) as refused:
        await run(client.status)
    assert refused.value.status == 401
    assert f"{path} holds none" in str(refused.value) and "COMPUTE_QUEUE_TOKEN" in str(
        refused.value
    )


async def test_a_kernel_also_looks_next_to_its_connection_file(
    runtime: Path, server_url: str, host_token: str, tmp_path: Path
) -> None:
    """A server started with ``--ServerApp.runtime_dir`` keeps its runtime files where its
    kernels' connection files are, while the kernel's JUPYTER_RUNTIME_DIR says elsewhere."""
    server_dir = tmp_path / "server-runtime"
    server_dir.mkdir()
    # This process starts the kernel: its pid is the kernel's parent, as a server's would be.
    server_file(server_dir, "cmdline", os.getpid(), server_url, host_token, "/nowhere")
    code = (
        "import json\n"
        "from jupyter_compute_queue import Client\n"
        "c = Client(queue='q')\n"
        "print(json.dumps([c.url, c.token, c.host.source, c.status()['queue']]))"
    )
    # The host answers on this test's loop: the kernel is driven from a thread.
    text = await run(run_in_new_kernel, code, server_dir / "kernel-t.json", runtime)
    url, token, source, queue = json.loads(text.strip().splitlines()[-1])
    assert (url, token, queue) == (server_url, host_token, "q"), text
    assert str(server_dir / "jpserver-cmdline.json") in source and "parent" in source


def run_in_new_kernel(code: str, connection_file: Path, runtime: Path) -> str:
    """What ``code`` prints (or its error) in a new kernel whose connection file is
    ``connection_file`` and whose JUPYTER_RUNTIME_DIR is ``runtime``."""
    from jupyter_client.manager import KernelManager

    manager = KernelManager(kernel_name="python3", connection_file=str(connection_file))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPUTE_QUEUE_", "JPY_"))}
    manager.start_kernel(env={**env, "JUPYTER_RUNTIME_DIR": str(runtime)})
    kernel = manager.client()
    kernel.start_channels()
    outputs: list[str] = []

    def collect(msg: dict[str, Any]) -> None:
        content = msg["content"]
        outputs.append(content.get("text", "") + "".join(content.get("traceback", [])))

    try:
        kernel.wait_for_ready(timeout=60)
        kernel.execute_interactive(code, timeout=60, output_hook=collect)
    finally:
        kernel.stop_channels()
        manager.shutdown_kernel(now=True)
    return "".join(outputs)


# --- discovery among two real servers --------------------------------------------------------

SERVER_START_TIMEOUT = 90.0  # two servers start at once; a loaded 2-core machine is slow
KERNEL_TIMEOUT = 60.0
# Only the extension: JupyterLab's and the LSP's would slow the start (and run npm).
ONLY_THE_EXTENSION = {
    "ServerApp": {
        "jpserver_extensions": {
            "jupyter_compute_queue": True,
            "jupyterlab": False,
            "jupyter_lsp": False,
            "jupyter_server_terminals": False,
            "notebook_shim": False,
        }
    }
}
# A urllib opener that ignores proxy settings: the servers are on 127.0.0.1.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class JupyterServer:
    """A real ``python -m jupyter_server`` with the extension (no local worker), its own token,
    data and log, writing its runtime file to the shared runtime folder like any server of the
    same user does."""

    name: str
    root: Path
    home: Path
    base_url: str
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    port: int = field(default_factory=free_loopback_port)
    process: subprocess.Popen[bytes] | None = None
    kernels: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.base_url}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def log_path(self) -> Path:
        return self.home / "server.log"

    def start(self, env: dict[str, str]) -> None:
        self.home.mkdir(parents=True)
        command = [
            sys.executable,
            "-m",
            "jupyter_server",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--ServerApp.base_url={self.base_url}",
            f"--ServerApp.root_dir={self.root}",
            f"--IdentityProvider.token={self.token}",
            "--ServerApp.allow_root=True",
            f"--ComputeQueueApp.data_dir={self.home / 'cq-data'}",
            "--ComputeQueueApp.local_worker=False",
        ]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, env=env, cwd=self.home, stdout=log, stderr=subprocess.STDOUT
            )

    def wait_ready(self, runtime: Path, deadline: float) -> None:
        """Until its runtime file names its URL and ``api/status`` answers (polled)."""
        assert self.process is not None
        info_file = runtime / f"jpserver-{self.pid}.json"
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server {self.name} exited ({self.process.returncode}):\n{self.log()}"
                )
            with contextlib.suppress(OSError, ValueError):
                if json.loads(info_file.read_text()).get("url") == self.url:
                    self.api("GET", "api/status")
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"server {self.name} not ready in time:\n{self.log()}")
            time.sleep(0.1)

    def api(self, method: str, path: str, payload: Any = None) -> Any:
        """A REST call with the token; the JSON answer (None for an empty one)."""
        request = urllib.request.Request(
            self.url + path,
            data=None if payload is None else json.dumps(payload).encode(),
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with DIRECT.open(request, timeout=30) as response:
            text = response.read()
        return json.loads(text) if text else None

    def start_kernel(self, path: str = "") -> str:
        """A python3 kernel started through the REST API (its cwd: ``path`` under the root)."""
        kernel_id = str(self.api("POST", "api/kernels", {"name": "python3", "path": path})["id"])
        self.kernels.append(kernel_id)
        return kernel_id

    def log(self, tail: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-tail:])

    def children(self) -> list[int]:
        """The pids of its child processes (its kernels), from /proc (none without one)."""
        pids: list[int] = []
        for task in Path(f"/proc/{self.pid}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                pids += [int(pid) for pid in task.read_text().split()]
        return pids

    def stop(self) -> None:
        """Its kernels through the API, then the server (terminate, wait, kill), then any
        kernel of it still running (a server that had to be killed leaves them)."""
        if self.process is None or self.process.poll() is not None:
            return
        children = self.children()
        for kernel_id in self.kernels:
            with contextlib.suppress(Exception):
                self.api("DELETE", f"api/kernels/{kernel_id}")
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
        for pid in children:
            with contextlib.suppress(OSError):
                command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                # Only if that pid is still one of these kernels, not a reused pid.
                if any(f"kernel-{kernel_id}.json" in command for kernel_id in self.kernels):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def two_servers(tmp_path: Path) -> Iterator[tuple[JupyterServer, JupyterServer, Path]]:
    """Servers A (base URL /a/, root R) and B (base URL /, root R/b), both running, writing
    their runtime files to one runtime folder; and that folder. B's root is inside A's, so a
    kernel of A working in R/b is in the deeper root of B: only its parent pid says A."""
    runtime, root = tmp_path / "runtime", tmp_path / "notebooks"
    (root / "b").mkdir(parents=True)
    config = tmp_path / "jupyter-config"
    config.mkdir()
    (config / "jupyter_server_config.json").write_text(json.dumps(ONLY_THE_EXTENSION))
    # Nothing that would find a host before the runtime files do.
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("COMPUTE_QUEUE_", "JUPYTERHUB_", "JPY_"))
    }
    env.update(
        JUPYTER_RUNTIME_DIR=str(runtime),
        JUPYTER_CONFIG_DIR=str(config),
        JUPYTER_DATA_DIR=str(tmp_path / "jupyter-data"),
        IPYTHONDIR=str(tmp_path / "ipython"),
    )
    a = JupyterServer("A", root, tmp_path / "server-a", "/a/")
    b = JupyterServer("B", root / "b", tmp_path / "server-b", "/")
    servers = (a, b)
    try:
        for server in servers:
            server.start(env)
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        for server in servers:
            server.wait_ready(runtime, deadline)
        yield a, b, runtime
    finally:
        for server in servers:
            server.stop()


FIND_THE_HOST = """
import json, os
from jupyter_compute_queue import Client
client = Client(queue="q")  # no URL: discovery
print(json.dumps({
    "pid": os.getpid(),
    "parent": os.getppid(),
    "cwd": os.getcwd(),
    "env": sorted(n for n in os.environ if n.startswith(("COMPUTE_QUEUE_", "JUPYTERHUB_"))),
    "url": client.url,
    "token_of": [name for name, token in TOKENS.items() if token == client.token],
    "source": client.host.source,
    "queue": client.status()["queue"],
}))
"""


def find_from_kernel(runtime: Path, kernel_id: str, tokens: dict[str, str]) -> dict[str, Any]:
    """Run FIND_THE_HOST in a running kernel, over its connection file; what it printed."""
    connection = runtime / f"kernel-{kernel_id}.json"
    assert connection.exists(), sorted(p.name for p in runtime.iterdir())
    kernel = BlockingKernelClient(connection_file=str(connection))
    kernel.load_connection_file()
    # No heartbeat: on a loaded machine a late beat reads as a dead kernel; waiting for
    # kernel_info (within KERNEL_TIMEOUT) is the readiness check.
    kernel.start_channels(hb=False)
    try:
        kernel.wait_for_ready(timeout=KERNEL_TIMEOUT)
        out: list[str] = []
        errors: list[str] = []

        def collect(message: dict[str, Any]) -> None:
            content = message["content"]
            if message["msg_type"] == "stream":
                (out if content["name"] == "stdout" else errors).append(content["text"])
            elif message["msg_type"] == "error":
                errors.append("\n".join(content["traceback"]))

        code = f"TOKENS = {tokens!r}\n{FIND_THE_HOST}"
        reply = kernel.execute_interactive(code, timeout=KERNEL_TIMEOUT, output_hook=collect)
        assert reply["content"]["status"] == "ok", "".join(errors)
    finally:
        kernel.stop_channels()
    assert out, "".join(errors)
    found: dict[str, Any] = json.loads("".join(out))
    return found


def test_discovery_in_kernels_of_two_running_servers_finds_their_own(
    two_servers: tuple[JupyterServer, JupyterServer, Path],
) -> None:
    """End to end, as a user with two servers has it: two real servers with their own tokens
    and base URLs, one runtime folder; the kernel each server started finds that server (URL
    and token) and a request to it answers. Both kernels work in R/b, B's root: for A's kernel
    only the parent-pid rule gives A, the root rule would give B."""
    a, b, runtime = two_servers
    assert sorted(p.name for p in runtime.glob("jpserver-*.json")) == sorted(
        [f"jpserver-{a.pid}.json", f"jpserver-{b.pid}.json"]
    )
    tokens = {a.name: a.token, b.name: b.token}
    kernels = [(a, a.start_kernel("b")), (b, b.start_kernel())]  # both running at once
    for server, kernel_id in kernels:
        found = find_from_kernel(runtime, kernel_id, tokens)
        # The premises: that server started it, in R/b, with no variable to find a host by.
        assert found["parent"] == server.pid, (server.name, found)
        assert Path(found["cwd"]) == b.root.resolve() and found["env"] == [], found
        # It found that server, not the other: its URL and its token, by the parent rule.
        assert (found["url"], found["token_of"]) == (server.url, [server.name]), found
        assert str(runtime / f"jpserver-{server.pid}.json") in found["source"], found
        assert "parent" in found["source"], found
        assert found["queue"] == "q"  # the status request answered


# --- redirects -------------------------------------------------------------------------------


class _Recorder(http.server.BaseHTTPRequestHandler):
    """A fake host (``redirect`` set: answers uploads with a 307 before reading the body, like
    an S3-backed host) or a fake blob store (stores what it gets). Records every request."""

    protocol_version = "HTTP/1.1"
    redirect: str | None = None
    seen: list[tuple[str, str, str | None, bytes]]

    def handle_expect_100(self) -> bool:
        if self.redirect is not None:
            return True  # decide before the body, as the host's PUT f/{key} does
        return super().handle_expect_100()

    def _answer(self, status: int, headers: dict[str, str], payload: bytes = b"") -> None:
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(payload))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        self.seen.append(("GET", self.path, self.headers.get("Authorization"), b""))
        self._answer(404, {"Content-Type": "application/json"}, b'{"error": "no such blob"}')

    def do_PUT(self) -> None:
        auth = self.headers.get("Authorization")
        if self.redirect is not None:
            self.seen.append(("PUT", self.path, auth, b""))
            self.close_connection = True
            self._answer(307, {"Location": self.redirect + "?signature=s3cr3t"})
            return
        data = self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append(("PUT", self.path, auth, data))
        self._answer(200, {})

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def recorder(redirect: str | None = None) -> Iterator[tuple[str, list[Any]]]:
    seen: list[Any] = []
    handler = type("Handler", (_Recorder,), {"redirect": redirect, "seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_an_upload_redirected_off_the_host_does_not_carry_the_token() -> None:
    data = os.urandom(300_000)
    key = hashlib.sha256(data).hexdigest()
    with recorder() as (store, stored), recorder(f"{store}/bucket/{key}") as (host, asked):
        client = Client(f"{host}/base/", "the-token", timeout=10)
        progress: list[tuple[int, int]] = []
        assert client.upload(data, lambda done, total: progress.append((done, total))) == key
    assert asked == [
        ("GET", f"/base/compute-queue/f/{key}/exists", "token the-token", b""),
        ("PUT", f"/base/compute-queue/f/{key}", "token the-token", b""),
    ]
    assert stored == [("PUT", f"/bucket/{key}?signature=s3cr3t", None, data)]
    assert progress[-1] == (len(data), len(data))
