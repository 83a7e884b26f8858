"""``--container-user image`` with an image whose user is not root (``USER 1000:1000``): the job
can write its ``/inputs`` (a per-run copy, SPEC §6), ``/outputs`` and the queue's
``/job-cache``, and what it leaves in ``/outputs`` comes back, also what only its own uid may
read. The default (``worker``) still runs as the worker's uid, with the folders as before."""

from __future__ import annotations

import contextlib
import io
import os
import re
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from jupyter_compute_queue.worker import engine_copy
from jupyter_compute_queue.worker.engine_copy import copy_out, unreadable

from .conftest import Fetch, StartWorker, remove_containers, run_job, unique_id

#: Writes everywhere a job may, as uid 1000, then prints what it sees.
SCRIPT = """
set -e
echo uid=$(id -u) gid=$(id -g)
echo modes=$(stat -c %a /inputs /outputs /job-cache | tr '\\n' ,)
echo changed > /inputs/given.txt
echo new > /inputs/new.txt
echo deeper > /inputs/sub/new.txt
rm /inputs/sub/nested.txt
mkdir -p /job-cache/d
echo cached-$JOB_RUN_ID >> /job-cache/d/c.txt
echo out > /outputs/out.txt
mkdir /outputs/private
echo mine > /outputs/private/p.txt
chmod 600 /outputs/private/p.txt
chmod 700 /outputs/private
echo given=$(cat /inputs/given.txt) cache=$(wc -l < /job-cache/d/c.txt)
"""
INPUTS = {
    "given.txt": {"type": "utf8", "value": "original\n"},
    "sub/nested.txt": {"type": "utf8", "value": "nested\n"},
}


def values(logs: str) -> dict[str, str]:
    """``name=value`` words of a job's log."""
    return dict(re.findall(r"(\w+)=(\S*)", logs))


@pytest.fixture
def uid1000_image(docker_engine: Any, test_images: Any) -> Iterator[str]:
    """The test busybox image with ``USER 1000:1000``, built here (no registry) and removed
    afterwards."""
    client = docker.from_env()
    tag = f"cq-test/busybox-uid1000:{uuid.uuid4().hex[:8]}"
    dockerfile = f"FROM {test_images.busybox}\nUSER 1000:1000\n".encode()
    client.images.build(fileobj=io.BytesIO(dockerfile), tag=tag, rm=True, forcerm=True)
    yield tag
    with contextlib.suppress(Exception):
        client.images.remove(tag, force=True)


@pytest.fixture
def worker_ids(docker_engine: Any) -> Iterator[list[str]]:
    """Worker ids whose containers and networks are removed at the end."""
    ids: list[str] = []
    yield ids
    client = docker.from_env()
    for worker in ids:
        remove_containers(client, worker)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def run_as_image_user(
    fetch: Fetch, start_worker: StartWorker, image: str, worker_ids: list[str], tmp_path: Path
) -> Path:
    """Two runs of SCRIPT on an image-user worker; its data dir."""
    worker_ids.append(unique_id("img"))
    await start_worker(worker_ids[-1], queues=("q",), network="none", container_user="image")
    for run in (1, 2):  # the second finds the first's /job-cache file (uid 1000's) and adds
        definition = {"image": image, "command": SCRIPT, "inputs": INPUTS, "env": {"N": str(run)}}
        result, logs = await run_job(fetch, definition)
        assert result["reason"] == "Success", (result, logs)
        got = values(logs)
        assert (got["uid"], got["gid"]) == ("1000", "1000"), logs
        assert got["modes"] == "777,777,777,", logs
        assert (got["given"], got["cache"]) == ("changed", str(run)), logs
        assert set(result["outputs"]) == {"out.txt", "private/p.txt"}, result["outputs"]
        job_id = result["jobId"]
        assert (await fetch("j", job_id, "outputs", "out.txt")).body == b"out\n"
        assert (await fetch("j", job_id, "outputs", "private", "p.txt")).body == b"mine\n"
    return tmp_path / f"worker-{worker_ids[-1]}"


async def test_a_non_root_image_user_writes_its_folders_and_its_outputs_come_back(
    fetch: Fetch,
    worker_ids: list[str],
    start_worker: StartWorker,
    uid1000_image: str,
    tmp_path: Path,
) -> None:
    data = await run_as_image_user(fetch, start_worker, uid1000_image, worker_ids, tmp_path)
    # The folders opened to every uid sit in folders of the worker's own, closed to others.
    assert mode(data / "runs") == 0o700 and mode(data / "job-cache") == 0o700
    assert mode(data / "job-cache" / "q") == 0o777


async def test_the_default_runs_as_the_worker_with_folders_as_before(
    fetch: Fetch,
    worker_ids: list[str],
    start_worker: StartWorker,
    uid1000_image: str,
    tmp_path: Path,
) -> None:
    worker_ids.append(unique_id("wrk"))
    await start_worker(worker_ids[-1], queues=("q",), network="none")
    command = "echo uid=$(id -u) gid=$(id -g); echo modes=$(stat -c %a /inputs /outputs /job-cache)"
    result, logs = await run_job(fetch, {"image": uid1000_image, "command": command})
    assert result["reason"] == "Success", (result, logs)
    got = values(logs)
    assert (got["uid"], got["gid"]) == (str(os.getuid()), str(os.getgid())), logs
    assert "777" not in logs, logs  # nothing opened to other uids
    data = tmp_path / f"worker-{worker_ids[-1]}"
    assert mode(data / "job-cache" / "q") & 0o022 == 0


# --- outputs a worker that is not root cannot read (worker/engine_copy.py) -------------


async def test_outputs_the_worker_cannot_read_come_through_the_engine(
    fetch: Fetch,
    worker_ids: list[str],
    start_worker: StartWorker,
    uid1000_image: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a worker that is not root meets (a root worker reads everything, so here the
    check is made to say so): the outputs are copied out of the exited container by the
    engine, and are the same."""
    copied: list[Path] = []
    real_copy = engine_copy.copy_out

    def copy_and_note(container: Any, dest: Path, cap: int) -> Path:
        copied.append(real_copy(container, dest, cap))
        return copied[-1]

    monkeypatch.setattr(engine_copy, "unreadable", lambda outputs: True)
    monkeypatch.setattr(engine_copy, "copy_out", copy_and_note)
    await run_as_image_user(fetch, start_worker, uid1000_image, worker_ids, tmp_path)
    assert len(copied) == 2


def test_unreadable_finds_what_only_another_uid_may_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outputs = tmp_path / "outputs"
    (outputs / "sub").mkdir(parents=True)
    (outputs / "sub" / "f").write_text("x")
    (outputs / "link").symlink_to("/nowhere")
    assert not unreadable(outputs)
    # A process that is not root is refused what the access bits refuse it (root is not).
    closed = {str(outputs / "sub" / "f")}
    monkeypatch.setattr(engine_copy.os, "access", lambda path, mode: str(path) not in closed)
    assert unreadable(outputs)
    closed = {str(outputs / "sub")}
    assert unreadable(outputs)


async def test_copy_out_takes_regular_files_only_and_keeps_to_the_cap(
    docker_engine: Any, uid1000_image: str, tmp_path: Path
) -> None:
    client = docker.from_env()
    outputs = tmp_path / "outputs"
    outputs.mkdir(mode=0o777)
    outputs.chmod(0o777)
    script = (
        "mkdir -p /outputs/a/b && echo deep > /outputs/a/b/f.txt && chmod 600 /outputs/a/b/f.txt"
        " && chmod 700 /outputs/a && ln -s /etc/passwd /outputs/link && mkfifo /outputs/fifo"
        " && head -c 1000 /dev/zero > /outputs/zeros"
    )
    container = client.containers.run(
        uid1000_image, ["sh", "-c", script], volumes={str(outputs): {"bind": "/outputs"}},
        network_mode="none", detach=True,
    )  # fmt: skip
    try:
        assert container.wait()["StatusCode"] == 0
        dest = copy_out(container, tmp_path / "copy", 10_000)
        files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
        assert files == ["a/b/f.txt", "zeros"]
        assert (dest / "a" / "b" / "f.txt").read_text() == "deep\n"
        assert not (dest / "link").exists() and not (dest / "link").is_symlink()
        with pytest.raises(engine_copy.TooLarge, match="cap of 999 bytes"):
            copy_out(container, tmp_path / "small", 999)
    finally:
        container.remove(force=True)
