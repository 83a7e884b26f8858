"""Secrets (docs/design.md, "Secrets"): names in the definition and the id, values only in the
submission, the host's memory, the assignment and the container — never on disk, in a record or
in a log. A real host, a real in-process worker and Docker; the magic through a real kernel; the
CLI as a real process.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jupyter_compute_queue.host.secrets import MAX_VALUE_BYTES, SecretBox, check_values
from jupyter_compute_queue.host.service import QueueService
from jupyter_compute_queue.worker.secrets import WORKER_ENV_PREFIX, Redactor, resolve

from ..kernel import CellRun, Kernel, magic_kernel
from .conftest import Fetch, StartWorker, body, submit, unique_id, wait_result

BUSYBOX = "cq-test/busybox:1"
CLI = [sys.executable, "-m", "jupyter_compute_queue.cli"]
#: Prints the secret (to be redacted) and writes its sha256 to /outputs (to see it arrived).
SHOW = 'echo "token=$TOKEN"; printf %s "$TOKEN" | sha256sum > /outputs/sha.txt'


def a_secret() -> str:
    return f"s3cr3t-{uuid.uuid4().hex}"


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def files_containing(root: Path, needle: str) -> list[Path]:
    """Every file under ``root`` whose bytes contain ``needle`` (SQLite and its WAL included)."""
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if needle.encode() in data:
                found.append(path)
    return found


async def output_sha(fetch: Fetch, job_id: str) -> str:
    text = (await fetch("j", job_id, "outputs", "sha.txt")).body.decode()
    return text.split()[0]


async def service_of(jp_serverapp: Any) -> QueueService:
    service: QueueService = await jp_serverapp.web_app.settings["compute_queue"].ready()
    return service


# --- a run with a secret ------------------------------------------------------------------------


async def test_a_secret_reaches_the_container_and_nothing_else(
    fetch: Fetch,
    start_worker: StartWorker,
    test_images: Any,
    tmp_path: Path,
    jp_serverapp: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    value, other = a_secret(), a_secret()
    definition = {"image": BUSYBOX, "command": SHOW, "secrets": ["TOKEN"]}
    await start_worker(unique_id())
    answer = await submit(fetch, "q", definition, secrets={"TOKEN": value})
    job_id = answer["jobId"]
    result = await wait_result(fetch, "q", job_id)
    assert result["reason"] == "Success", result
    assert await output_sha(fetch, job_id) == sha(value)  # the container had the value

    logs = (await fetch("q", "q", "j", job_id, "logs")).body.decode()
    assert "token=***\n" in logs and value not in logs
    served = [
        (await fetch("q", "q", "j", job_id, "definition.json")).body,
        (await fetch("q", "q", "j", job_id, "result.json")).body,
        (await fetch("q", "q", "j", job_id)).body,
        (await fetch("q", "q", "j", job_id, "logs", params={"format": "jsonl"})).body,
        (await fetch("q", "q")).body,
    ]
    assert all(value.encode() not in part for part in served)
    assert body(await fetch("j", job_id, "definition.json"))["secrets"] == ["TOKEN"]

    # Nothing on disk anywhere: the host's data dir (SQLite, WAL, logs, blobs), the worker's.
    assert files_containing(tmp_path, value) == []
    assert value not in caplog.text  # nor in what the host and the worker log
    assert len((await service_of(jp_serverapp)).secrets) == 0  # dropped with the run

    # Values are not in the id: another value is the same job, answered from the cache.
    again = await submit(fetch, "q", definition, secrets={"TOKEN": other})
    assert again["jobId"] == job_id and again["cached"] is True
    assert len((await service_of(jp_serverapp)).secrets) == 0  # a cache hit keeps nothing
    rerun = await submit(fetch, "q", definition, secrets={"TOKEN": other}, rerun=True)
    assert rerun["jobId"] == job_id and rerun["runId"] != answer["runId"]
    await wait_result(fetch, "q", job_id)
    assert await output_sha(fetch, job_id) == sha(other)
    assert files_containing(tmp_path, other) == []


async def test_a_value_split_across_writes_is_still_redacted(
    fetch: Fetch, start_worker: StartWorker, test_images: Any
) -> None:
    value = "abcdefgh-12345678"
    # The job prints the value in two writes a moment apart: two chunks of the log stream.
    command = "printf 'before abcdefgh'; sleep 0.3; printf '%s after\\n' -12345678; echo end"
    definition = {"image": BUSYBOX, "command": command, "secrets": ["TOKEN"]}
    await start_worker(unique_id())
    answer = await submit(fetch, "q", definition, secrets={"TOKEN": value})
    result = await wait_result(fetch, "q", answer["jobId"])
    assert result["reason"] == "Success", result
    logs = (await fetch("q", "q", "j", answer["jobId"], "logs")).body.decode()
    assert logs == "before *** after\nend\n"


async def test_the_worker_falls_back_on_its_own_prefixed_variable(
    fetch: Fetch, start_worker: StartWorker, test_images: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    value = a_secret()
    monkeypatch.setenv(WORKER_ENV_PREFIX + "TOKEN", value)
    monkeypatch.setenv("TOKEN", "the worker's own TOKEN is never offered")
    definition = {"image": BUSYBOX, "command": SHOW + f" # {uuid.uuid4()}", "secrets": ["TOKEN"]}
    await start_worker(unique_id())
    answer = await submit(fetch, "q", definition)  # no values in the submission
    result = await wait_result(fetch, "q", answer["jobId"])
    assert result["reason"] == "Success", result
    assert await output_sha(fetch, answer["jobId"]) == sha(value)
    logs = (await fetch("q", "q", "j", answer["jobId"], "logs")).body.decode()
    assert "token=***" in logs and value not in logs  # the worker's values are redacted too


async def test_a_secret_without_a_value_ends_the_run_error_naming_it(
    fetch: Fetch, start_worker: StartWorker, test_images: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(WORKER_ENV_PREFIX + "NOWHERE", raising=False)
    monkeypatch.setenv("NOWHERE", "not this one")  # the plain name is never used
    definition = {"image": BUSYBOX, "command": "touch /outputs/ran", "secrets": ["NOWHERE"]}
    await start_worker(unique_id())
    answer = await submit(fetch, "q", definition)
    result = await wait_result(fetch, "q", answer["jobId"])
    assert result["reason"] == "Error", result
    message = result["message"]
    assert "NOWHERE" in message and "submit the job again" in message, message
    assert f"{WORKER_ENV_PREFIX}NOWHERE" in message
    assert result["outputs"] == {}  # no container ran


async def test_after_the_host_forgot_the_values_the_run_errors(
    fetch: Fetch, start_worker: StartWorker, test_images: Any, jp_serverapp: Any
) -> None:
    # What a host restart does to an unfinished run: its values are gone from memory.
    definition = {"image": BUSYBOX, "command": SHOW + f" # {uuid.uuid4()}", "secrets": ["TOKEN"]}
    answer = await submit(fetch, "q", definition, secrets={"TOKEN": a_secret()})
    service = await service_of(jp_serverapp)
    assert service.secrets.get(answer["runId"])
    service.secrets.drop(answer["runId"])
    await start_worker(unique_id())
    result = await wait_result(fetch, "q", answer["jobId"])
    assert result["reason"] == "Error" and "TOKEN" in result["message"], result


async def test_a_join_keeps_the_first_values_and_adds_missing_ones(
    fetch: Fetch, start_worker: StartWorker, test_images: Any
) -> None:
    first, second, extra = a_secret(), a_secret(), a_secret()
    command = 'printf %s "$A" | sha256sum > /outputs/a; printf %s "$B" | sha256sum > /outputs/b'
    definition = {"image": BUSYBOX, "command": command, "secrets": ["A", "B"]}
    queued = await submit(fetch, "q", definition, secrets={"A": first}, namespace="one")
    joined = await submit(
        fetch, "q", definition, secrets={"A": second, "B": extra}, namespace="two"
    )
    assert joined["runId"] == queued["runId"]
    await start_worker(unique_id())  # nothing ran before: the run is still queued
    result = await wait_result(fetch, "q", queued["jobId"])
    assert result["reason"] == "Success", result
    got_a = (await fetch("j", queued["jobId"], "outputs", "a")).body.decode().split()[0]
    got_b = (await fetch("j", queued["jobId"], "outputs", "b")).body.decode().split()[0]
    assert (got_a, got_b) == (sha(first), sha(extra))


# --- refused submissions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("secrets", "words"),
    [
        ({"OTHER": "x"}, ["secrets.OTHER", "it lists: TOKEN"]),
        ({"TOKEN": 3}, ["secrets.TOKEN", "string"]),
        ({"TOKEN": "a\x00b"}, ["secrets.TOKEN", "NUL"]),
        ({"TOKEN": "x" * (MAX_VALUE_BYTES + 1)}, ["secrets.TOKEN", "bytes"]),
        (["TOKEN"], ["secrets: a map"]),
    ],
)
async def test_bad_envelope_secrets_are_a_400_naming_them(
    fetch: Fetch, secrets: Any, words: list[str]
) -> None:
    definition = {"image": BUSYBOX, "command": "true", "secrets": ["TOKEN"]}
    response = await fetch(
        "q", "q", method="POST", json={"definition": definition, "secrets": secrets}
    )
    assert response.code == 400, response.body
    error = body(response)["error"]
    assert all(word in error for word in words), error
    assert "x" * 100 not in error  # a value is never echoed


async def test_values_for_a_definition_without_secrets_are_a_400(fetch: Fetch) -> None:
    payload = [{"definition": {"image": BUSYBOX}, "secrets": {"TOKEN": "value"}}]
    response = await fetch("q", "q", method="POST", json=payload)
    assert response.code == 400
    assert body(response)["error"].startswith("[0]secrets.TOKEN: not a secret"), response.body


async def test_a_bad_secret_name_in_the_definition_is_a_400(fetch: Fetch) -> None:
    response = await fetch("q", "q", method="POST", json={"image": BUSYBOX, "secrets": ["JOB_X"]})
    assert response.code == 400 and body(response)["error"].startswith("secrets: "), response.body


# --- the pieces, without a host -----------------------------------------------------------------


def test_check_values() -> None:
    assert check_values(None, ["A"]) == {}
    assert check_values({"A": ""}, ["A", "B"]) == {"A": ""}
    with pytest.raises(ValueError, match=r"^secrets: the values add up"):
        check_values(
            {f"S{i}": "x" * MAX_VALUE_BYTES for i in range(5)}, [f"S{i}" for i in range(5)]
        )


def test_the_box_keeps_the_first_value_of_each_name() -> None:
    box = SecretBox()
    box.keep("r", {"A": "1"})
    box.keep("r", {"A": "2", "B": "3"})
    box.keep("s", {})
    assert box.get("r") == {"A": "1", "B": "3"} and box.get("s") == {} and len(box) == 1
    box.drop("r")
    assert box.get("r") == {} and len(box) == 0


def test_resolve_takes_the_assignment_then_the_prefixed_variable() -> None:
    environ = {WORKER_ENV_PREFIX + "B": "from-worker", "C": "plain name: never"}
    values, missing = resolve(["A", "B", "C"], {"A": "sent", "Z": "not listed"}, environ)
    assert values == {"A": "sent", "B": "from-worker"} and missing == ["C"]


def test_redactor_replaces_values_within_and_across_chunks() -> None:
    r = Redactor(["secret-value", "abc", "secret"])  # "abc" is too short to redact
    assert r.feed("out", "a secret-value, a secret, abc\n") == "a ***, a ***, abc\n"
    assert r.feed("out", "x secr") == "x "  # could be the start of a value: held back
    # Streams are apart; "secret" is held too, as it may be the start of "secret-value".
    assert r.feed("err", "err secret-val") == "err "
    assert r.feed("out", "et-value y") == "*** y"
    assert r.feed("err", "ley") == "***-valley"  # not the long value, but "secret" in it
    assert r.feed("out", "tail secre") == "tail "
    assert r.flush() == [("out", "secre")]  # the end of the run: no value in it whole
    assert r.flush() == []
    assert not Redactor(["abc", ""])  # nothing long enough: nothing to do


# --- front ends ---------------------------------------------------------------------------------


async def test_cli_secret_from_the_environment(
    fetch: Fetch,
    start_worker: StartWorker,
    test_images: Any,
    tmp_path: Path,
    host_token: str,
    jp_http_port: int,
    jp_base_url: str,
) -> None:
    value = a_secret()
    runtime = tmp_path / "no-servers"
    runtime.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPUTE_QUEUE_", "JUPYTER"))}
    env.pop("TOKEN", None)
    env.update(
        JUPYTER_RUNTIME_DIR=str(runtime),
        COMPUTE_QUEUE_URL=f"http://127.0.0.1:{jp_http_port}{jp_base_url}",
        COMPUTE_QUEUE_TOKEN=host_token,
    )

    async def cq(*args: str, **extra: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            *CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL, env={**env, **extra}, cwd=tmp_path,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        return int(proc.returncode or 0), out.decode(), err.decode()

    unset = await cq("job", "add", "q", "-i", BUSYBOX, "-c", SHOW, "--secret", "TOKEN")
    assert unset[0] == 2 and "--secret TOKEN: not set here" in unset[2], unset
    inline = await cq("job", "add", "q", "-i", BUSYBOX, "-c", SHOW, "--secret", f"TOKEN={value}")
    assert inline[0] == 2 and "give the name only" in inline[2] and value not in inline[2], inline

    await start_worker(unique_id())
    code, out, err = await cq(
        "job", "add", "q", "-i", BUSYBOX, "-c", SHOW, "--secret", "TOKEN", "-o", "got", TOKEN=value
    )
    assert code == 0, err
    assert out == "token=***\n" and value not in out + err
    assert (tmp_path / "got" / "sha.txt").read_text().split()[0] == sha(value)
    assert files_containing(tmp_path, value) == []


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kernel]:
    with magic_kernel(tmp_path_factory.mktemp("kernel")) as k:
        yield k


async def cell(kernel: Kernel, code: str) -> CellRun:
    return await asyncio.to_thread(kernel.run, code, str(uuid.uuid4()))


async def test_the_magic_takes_a_secret_from_the_kernels_environment(
    kernel: Kernel,
    fetch: Fetch,
    start_worker: StartWorker,
    test_images: Any,
    tmp_path: Path,
    jp_http_port: int,
    jp_base_url: str,
    host_token: str,
) -> None:
    value = a_secret()
    url = f"http://127.0.0.1:{jp_http_port}{jp_base_url}"
    setup = (
        "import os\n"
        f"os.environ.update(COMPUTE_QUEUE_URL={url!r}, COMPUTE_QUEUE_TOKEN={host_token!r})\n"
        "os.environ.pop('MAGIC_TOKEN', None)\n"
        f"os.chdir({str(tmp_path)!r})"
    )
    assert (await cell(kernel, setup)).ok
    magic = f"%%container -q q -i {BUSYBOX} --secret MAGIC_TOKEN --out job\n"
    body_text = 'echo "t=$MAGIC_TOKEN"\nprintf %s "$MAGIC_TOKEN" | sha256sum > /outputs/sha.txt\n'

    unset = await cell(kernel, magic + body_text)
    assert not unset.ok and "--secret MAGIC_TOKEN: not set in the kernel" in str(unset.errors)

    await start_worker(unique_id("magic"))
    # The value is set by code that is not the cell: the notebook never holds it.
    assert (await cell(kernel, f"os.environ['MAGIC_TOKEN'] = {value!r}")).ok
    run = await cell(kernel, magic + body_text)
    assert run.ok, run
    assert "t=***" in run.stdout and value not in run.stdout + run.stderr
    ids = await cell(kernel, "import json; print(json.dumps([job.job_id, job.definition()]))")
    job_id, definition = json.loads(ids.stdout.strip().splitlines()[-1])
    assert definition["secrets"] == ["MAGIC_TOKEN"] and value not in json.dumps(definition)
    assert (tmp_path / "outputs" / job_id[:12] / "sha.txt").read_text().split()[0] == sha(value)
    assert files_containing(tmp_path, value) == []
