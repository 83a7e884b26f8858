"""``jupyter compute-queue job …`` and ``queue status|new`` as a user runs them.

Real subprocesses (``python -m jupyter_compute_queue.cli``) against the real test host, a real
in-process worker and Docker. The host runs on the test's event loop, so every command runs
through ``asyncio.create_subprocess_exec`` and the loop keeps serving while it runs. Discovery
is pinned: ``COMPUTE_QUEUE_URL``/``_TOKEN`` point at the test server and the Jupyter runtime
folder is an empty one, so no other server on the machine can answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import sys
import uuid
import zipfile
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from jupyter_compute_queue.host.access import worker_credential
from jupyter_compute_queue.host.datadir import host_secret
from jupyter_compute_queue.model.jobs import job_id
from jupyter_compute_queue.worker.docker_runner import LABEL_WORKER

from .conftest import Fetch, StartWorker, body

BUSYBOX = "cq-test/busybox:1"
CLI = [sys.executable, "-m", "jupyter_compute_queue.cli"]


@dataclass
class Out:
    code: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return self.stdout.splitlines()

    def one_error(self, *words: str) -> None:
        """The command failed with one clear line on stderr naming ``words``."""
        errors = [line for line in self.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and "Traceback" not in self.stderr, self.stderr
        for word in words:
            assert word in errors[0], self.stderr


CQ = Callable[..., Awaitable[Out]]


@pytest.fixture(scope="module")
def wid(docker_engine: Any) -> Iterator[str]:
    """One worker id (so one worker network) for the module; its network removed at the end."""
    worker = f"cli-{uuid.uuid4().hex[:8]}"
    yield worker
    for network in docker_engine.networks.list(filters={"label": f"{LABEL_WORKER}={worker}"}):
        with contextlib.suppress(Exception):
            network.remove()


@pytest.fixture
def server_url(jp_http_port: int, jp_base_url: str, fetch: Fetch) -> str:
    """The test server's URL with its base URL (``fetch`` makes the server listen)."""
    return f"http://127.0.0.1:{jp_http_port}{jp_base_url}"


@pytest.fixture
def cli_env(server_url: str, host_token: str, tmp_path: Path) -> dict[str, str]:
    """The CLI's environment: the test host, and no Jupyter server to discover."""
    runtime = tmp_path / "no-servers"
    runtime.mkdir()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("COMPUTE_QUEUE_", "JUPYTERHUB_"))
    }
    env.update(
        JUPYTER_RUNTIME_DIR=str(runtime),
        COMPUTE_QUEUE_URL=server_url,
        COMPUTE_QUEUE_TOKEN=host_token,
    )
    return env


@pytest.fixture
def cq(cli_env: dict[str, str], tmp_path: Path) -> CQ:
    """Run the CLI: ``await cq("job", "get", ID, input=…, env={"X": None to drop it})``."""

    async def call(
        *args: str,
        input: str | None = None,
        env: Mapping[str, str | None] | None = None,
        cwd: Path | None = None,
    ) -> Out:
        environ = dict(cli_env)
        for key, value in (env or {}).items():
            if value is None:
                environ.pop(key, None)
            else:
                environ[key] = value
        proc = await asyncio.create_subprocess_exec(
            *CLI,
            *args,
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=environ,
            cwd=cwd or tmp_path,
        )
        data = None if input is None else input.encode()
        out, err = await asyncio.wait_for(proc.communicate(data), 120)
        assert proc.returncode is not None
        return Out(proc.returncode, out.decode(), err.decode())

    return call


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"not {what} within {timeout}s"
        await asyncio.sleep(0.1)


def busybox(command: str) -> dict[str, Any]:
    return {"image": BUSYBOX, "command": command}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- job add ---------------------------------------------------------------------------------


async def test_add_wait_streams_the_log_and_exits_with_the_jobs_code(
    cq: CQ, start_worker: StartWorker, wid: str, test_images: Any, tmp_path: Path
) -> None:
    await start_worker(wid, max_output_bytes=50_000)
    failed, error = await asyncio.gather(
        cq("job", "add", "q", "-i", BUSYBOX, "-c", "echo to-out; echo to-err >&2; exit 3", "-w"),
        cq("job", "add", "q", "-i", BUSYBOX, "-c", "head -c 99999 /dev/zero > /outputs/z", "-w"),
    )
    assert failed.code == 3, failed.stderr
    assert "to-out\n" in failed.stdout and "to-err" not in failed.stdout
    assert "to-err\n" in failed.stderr and "finished: Failed (exit code 3)" in failed.stderr
    assert error.code == 125 and "finished: Error" in error.stderr  # past the output cap

    (tmp_path / "data.txt").write_text("hello file\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.txt").write_text("in a folder\n")
    script = (
        "cat /inputs/data.txt /inputs/again.txt /inputs/folder/a.txt; echo $GREETING; "
        "cp /inputs/data.txt /outputs/copy.txt; mkdir /outputs/sub; echo n > /outputs/sub/n.txt"
    )
    ok = await cq(
        "job", "add", "q", "-i", BUSYBOX, "-c", script, "-e", "GREETING=hi",
        "-f", "data.txt", "-f", "again.txt=data.txt", "-f", str(tmp_path / "folder"),
        "-o", "got",
    )  # fmt: skip
    assert ok.code == 0, ok.stderr
    assert ok.stdout == "hello file\nhello file\nin a folder\nhi\n"
    assert "finished: Success" in ok.stderr and "2 output file(s) in got" in ok.stderr
    assert (tmp_path / "got" / "copy.txt").read_text() == "hello file\n"
    assert (tmp_path / "got" / "sub" / "n.txt").read_text() == "n\n"

    timed_out = await cq(
        "job", "add", "q", "-i", BUSYBOX, "-c", "sleep 30", "--max-duration", "1s", "--wait"
    )
    assert timed_out.code == 124 and "finished: TimedOut" in timed_out.stderr


async def test_the_log_is_live_and_a_cancel_ends_the_wait(
    cq: CQ,
    cli_env: dict[str, str],
    fetch: Fetch,
    start_worker: StartWorker,
    wid: str,
    test_images: Any,
) -> None:
    await start_worker(wid)
    done = await cq("job", "add", "q", "-i", BUSYBOX, "-c", "echo done", "--wait")
    assert done.code == 0
    waiting = await asyncio.create_subprocess_exec(
        *CLI, "job", "add", "q", "-i", BUSYBOX, "-c", "echo first; sleep 60", "--wait",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env,
    )  # fmt: skip
    try:
        await _follow_then_cancel(cq, fetch, waiting, wid)
    finally:
        if waiting.returncode is None:
            waiting.kill()
            await waiting.wait()


async def _follow_then_cancel(
    cq: CQ, fetch: Fetch, waiting: asyncio.subprocess.Process, wid: str
) -> None:
    assert waiting.stdout is not None and waiting.stderr is not None
    first = await asyncio.wait_for(waiting.stdout.readline(), 60)
    assert first == b"first\n"
    queued = (await asyncio.wait_for(waiting.stderr.readline(), 10)).decode()
    long_id = re.search(r"/j/([0-9a-f]{64})", queued)
    assert long_id, queued
    ident = long_id.group(1)
    result = body(await fetch("q", "q", "j", ident, "result.json"))
    assert result["state"] == "Running"  # the line came while the job ran

    listed = await cq("job", "list", "q", "--state", "running", "--json")
    assert [r["jobId"] for r in json.loads(listed.stdout)] == [ident]
    table = await cq("job", "list", "q")
    rows = {line.split()[1]: line for line in table.lines[1:]}
    assert table.lines[0].split()[:4] == ["RUN", "JOB", "STATE", "REASON/PHASE"]
    assert "Running" in rows[ident[:12]] and "Success" in rows[job_id(busybox("echo done"))[:12]]
    only_finished = await cq("job", "list", "q", "--state", "Finished", "--json")
    assert {r["state"] for r in json.loads(only_finished.stdout)} == {"Finished"}

    status = await cq("queue", "status", "q")
    assert status.code == 0 and "1 running, 1 finished" in status.stdout and wid in status.stdout
    data = json.loads((await cq("queue", "status", "q", "--json")).stdout)
    assert data["counts"]["Running"] == 1 and [w["id"] for w in data["workers"]] == [wid]

    cancel = await cq("job", "cancel", ident)
    assert cancel.code == 0 and cancel.stdout == f"job {ident[:12]}: cancelled\n"
    await asyncio.wait_for(waiting.wait(), 60)
    rest = (await waiting.stderr.read()).decode()
    assert waiting.returncode == 130 and "finished: Cancelled" in rest
    again = await cq("job", "cancel", ident, "--queue", "q")
    assert again.code == 0 and "nothing to cancel" in again.stdout


async def test_definitions_from_stdin_and_invalid_ones(cq: CQ, tmp_path: Path) -> None:
    definition = {"image": BUSYBOX, "command": ["sleep", "60"]}  # nobody serves "idle"
    envelope = {"definition": definition, "namespace": "mine"}
    (tmp_path / "job.json").write_text(json.dumps(busybox("echo $X")))
    sent, bare, from_file = await asyncio.gather(
        cq("job", "add", "idle", "-", input=json.dumps(envelope)),
        cq("job", "add", "idle", "-", "--rerun", input=json.dumps(busybox("true"))),
        cq("job", "add", "idle", "job.json", "-e", "X=1", "--cpus", "2"),
    )
    ident = job_id(definition)
    assert sent.code == 0 and sent.lines[0] == ident, sent.stderr
    assert sent.lines[1].endswith(f"/compute-queue/q/idle/j/{ident}")
    assert f"job {ident[:12]} is Queued in queue 'idle'" in sent.stderr
    assert bare.code == 0 and bare.lines[0] == job_id(busybox("true"))
    with_options = {**busybox("echo $X"), "env": {"X": "1"}, "requirements": {"cpus": 2}}
    assert from_file.code == 0 and from_file.lines[0] == job_id(with_options)
    held = json.loads((await cq("job", "list", "idle", "--namespace", "mine", "--json")).stdout)
    assert [r["jobId"] for r in held] == [ident] and held[0]["namespaces"] == ["mine"]

    bad = await asyncio.gather(
        cq("job", "add", "idle", "-i", BUSYBOX, "-c", "true", "--memory", "lots"),
        cq("job", "add", "idle", "-", input=json.dumps({**definition, "bogus": 1})),
        cq("job", "add", "idle", "-", input="not json"),
        cq("job", "add", "idle"),
        cq("job", "add", "idle", "-i", BUSYBOX, "-f", "missing.txt"),
        cq("job", "add", "idle", "job.json", "--max-duration", "soon"),
    )
    assert [out.code for out in bad] == [2] * 6
    bad[0].one_error("requirements.memory", "'lots'")
    bad[1].one_error("bogus")
    bad[2].one_error("not JSON")
    bad[3].one_error("nothing to run")
    bad[4].one_error("missing.txt")
    bad[5].one_error("maxDuration")

    timeout = await cq("job", "wait", ident, "--timeout", "0.5")
    assert timeout.code == 6 and "did not finish within 0.5 s" in timeout.stderr
    unfinished = await cq("job", "outputs", ident)
    assert unfinished.code == 1
    unfinished.one_error("Queued", "job wait")
    assert (await cq("job", "cancel", ident)).code == 0
    cancelled = await cq("job", "wait", ident)
    assert cancelled.code == 130 and "finished: Cancelled" in cancelled.stderr


async def test_get_logs_wait_and_outputs(
    cq: CQ, start_worker: StartWorker, wid: str, test_images: Any, tmp_path: Path
) -> None:
    await start_worker(wid)
    script = (
        "echo line one; mkdir /outputs/sub; echo top > /outputs/top.txt; "
        "echo n > /outputs/sub/n.txt"
    )
    added, failing = await asyncio.gather(
        cq("job", "add", "q", "-i", BUSYBOX, "-c", script),
        cq("job", "add", "q", "-i", BUSYBOX, "-c", "echo bye; exit 7"),
    )
    ident, short = added.lines[0], added.lines[0][:12]
    waited, failed = await asyncio.gather(
        cq("job", "wait", ident), cq("job", "wait", failing.lines[0])
    )
    assert waited.code == 0 and f"job {short} finished: Success" in waited.stderr
    assert failed.code == 7 and "Failed (exit code 7)" in failed.stderr

    got, by_prefix, short_alone, logs, followed = await asyncio.gather(
        cq("job", "get", ident),
        cq("job", "get", short, "--queue", "q"),
        cq("job", "get", short),
        cq("job", "logs", ident),
        cq("job", "logs", short, "--queue", "q", "--follow"),
    )
    data = json.loads(got.stdout)
    assert data["jobId"] == ident and data["definition"] == {"image": BUSYBOX, "command": script}
    assert [r["reason"] for r in data["runs"]] == ["Success"]
    assert json.loads(by_prefix.stdout)["runs"] == data["runs"]
    assert short_alone.code == 2
    short_alone.one_error("--queue")
    assert logs.stdout == followed.stdout == "line one\n"

    folder, named, zipped = await asyncio.gather(
        cq("job", "outputs", ident),
        cq("job", "outputs", ident, "-o", "mine"),
        cq("job", "outputs", ident, "--zip"),
    )
    assert folder.code == named.code == zipped.code == 0
    assert sorted(folder.lines) == [f"outputs/{short}/sub/n.txt", f"outputs/{short}/top.txt"]
    assert (tmp_path / "outputs" / short / "top.txt").read_text() == "top\n"
    assert (tmp_path / "mine" / "sub" / "n.txt").read_text() == "n\n"
    assert zipped.lines == [f"outputs/{short}.zip"]
    with zipfile.ZipFile(tmp_path / "outputs" / f"{short}.zip") as archive:
        assert sorted(archive.namelist()) == ["sub/n.txt", "top.txt"]


# --- queue new, errors -----------------------------------------------------------------------


async def test_queue_new_prints_a_name_and_its_url(cq: CQ, server_url: str) -> None:
    found, given, alone = await asyncio.gather(
        cq("queue", "new"),
        cq("queue", "new", "--url", "https://example.org/base"),
        cq("queue", "new", env={"COMPUTE_QUEUE_URL": None}),
    )
    name = found.lines[0]
    assert re.fullmatch(r"[0-9a-f]{32}", name)
    assert found.lines == [name, f"{server_url}compute-queue/q/{name}"]
    assert given.lines[1] == f"https://example.org/base/compute-queue/q/{given.lines[0]}"
    assert alone.code == 0 and len(alone.lines) == 1
    assert re.fullmatch(r"[0-9a-f]{32}", alone.lines[0]) and alone.lines[0] != name
    assert "no host found" in alone.stderr


async def test_exit_codes_of_errors(cq: CQ, host_token: str, tmp_path: Path) -> None:
    unknown = "0" * 64
    nowhere = f"http://127.0.0.1:{closed_port()}/"
    other_queue = worker_credential(host_secret(tmp_path / "cq-data"), "other")
    results = await asyncio.gather(
        cq("job", "get", unknown),
        cq("job", "wait", unknown, "--queue", "q"),
        cq("job", "get", "not-an-id"),
        cq("queue", "status", "q", env={"COMPUTE_QUEUE_TOKEN": "wrong"}),
        cq("queue", "status", "q", "--token", other_queue),
        cq("job", "list", "q", env={"COMPUTE_QUEUE_URL": None}),
        cq("job", "add", "q", "-i", BUSYBOX, "-c", "true", env={"COMPUTE_QUEUE_URL": nowhere}),
        cq("job", "cancel", unknown, "--url", nowhere, "--token", host_token),
    )
    codes = [out.code for out in results]
    assert codes == [4, 4, 2, 5, 5, 3, 3, 3], [r.stderr for r in results]
    results[0].one_error("is not known", "HTTP 404")
    results[2].one_error("64 hex digits")
    results[3].one_error("HTTP 401")
    results[4].one_error("HTTP 403")
    results[5].one_error("no compute-queue host found", "COMPUTE_QUEUE_URL")
    results[6].one_error("cannot reach the host")
    results[7].one_error("cannot reach the host")
