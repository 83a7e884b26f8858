"""A job through host, worker and Docker: the main path."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from .conftest import Fetch, StartWorker, body, run_job, unique_id


async def test_inputs_outputs_env_and_logs(
    fetch: Fetch, start_worker: StartWorker, test_images: Any
) -> None:
    blob = b"blob input\n"
    key = hashlib.sha256(blob).hexdigest()
    assert (await fetch("f", key, method="PUT", body=blob)).code == 201
    script = "\n".join(
        [
            "echo out-line",
            "echo err-line >&2",
            "cat /inputs/t.txt /inputs/d/b.bin /inputs/k.txt /inputs/j.json /inputs/rel.cfg",
            "cat /etc/abs.cfg",
            "echo $JOB_ID $JOB_RUN_ID $JOB_QUEUE $JOB_INPUTS $JOB_OUTPUTS $JOB_CACHE",
            "echo $JOB_URL",
            "mkdir -p /outputs/sub && echo nested > /outputs/sub/n.txt",
            "echo top > /outputs/top.txt",
            "ln -s /etc/passwd /outputs/link",
            "echo $GREETING",
        ]
    )
    definition = {
        "image": test_images.busybox,
        "command": ["sh", "-c", script],
        "env": {"GREETING": "hi there"},
        "inputs": {
            "t.txt": {"type": "utf8", "value": "text input\n"},
            "d/b.bin": {"type": "base64", "value": base64.b64encode(b"b64 input\n").decode()},
            "k.txt": {"type": "key", "value": key},
            "j.json": {"type": "json", "value": {"b": 1, "a": [1.0]}},
        },
        "configFiles": {
            "rel.cfg": {"type": "utf8", "value": "\nrelative config\n"},
            "/etc/abs.cfg": {"type": "utf8", "value": "absolute config\n"},
        },
    }
    await start_worker(unique_id())
    result, logs = await run_job(fetch, definition)
    assert result["reason"] == "Success" and result["exitCode"] == 0, (result, logs)
    for text in [
        "out-line",
        "err-line",
        "text input",
        "b64 input",
        "blob input",
        '{"a":[1],"b":1}',
        "relative config",
        "absolute config",
        "hi there",
    ]:
        assert text in logs, text
    job_id = result["jobId"]
    assert f"{job_id} {result['runId']} q /inputs /outputs /job-cache" in logs
    assert f"/compute-queue/q/q/j/{job_id}" in logs
    assert set(result["outputs"]) == {"top.txt", "sub/n.txt"}  # the symlink is not followed
    assert (await fetch("j", job_id, "outputs", "sub", "n.txt")).body == b"nested\n"
    jsonl = (await fetch("j", job_id, "logs", params={"format": "jsonl"})).body.decode()
    # Each stream's text (a record may hold several lines: Docker decides the chunks).
    text: dict[str, str] = {}
    for line in jsonl.splitlines():
        record = json.loads(line)
        text[record["s"]] = text.get(record["s"], "") + record["d"]
    assert "out-line" in text["out"].splitlines() and "err-line" not in text["out"]
    assert "err-line" in text["err"].splitlines() and "out-line" not in text["err"]


async def test_failure_keeps_the_exit_code(
    fetch: Fetch, start_worker: StartWorker, test_images: Any
) -> None:
    await start_worker(unique_id())
    # "exit 3" has no shell syntax, so it would run a program called exit: ask for the shell.
    result, _ = await run_job(fetch, {"image": test_images.busybox, "command": "exit 3;"})
    assert result["reason"] == "Failed" and result["exitCode"] == 3
    result, logs = await run_job(fetch, {"image": test_images.busybox, "command": "no-such-tool"})
    assert result["reason"] == "Failed" and result["exitCode"] == 127, logs


async def test_a_finished_result_is_reused(
    fetch: Fetch, start_worker: StartWorker, test_images: Any
) -> None:
    await start_worker(unique_id())
    definition = {"image": test_images.busybox, "command": "date +%s%N"}
    first, _ = await run_job(fetch, definition)
    again = body(await fetch("q", "q", method="POST", json=definition))
    assert again["cached"] is True and again["runId"] == first["runId"]
