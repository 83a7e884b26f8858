"""What the Docker runner limits (SPEC §6, §12), checked from inside real containers.

Every worker here gets its own id (other suites on the same engine use ``w1``; a worker removes
its id's leftover containers when it registers) and ``network="none"``, so no Docker network is
made or left behind.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from typing import Any

import docker

from jupyter_compute_queue.worker.agent import Agent
from jupyter_compute_queue.worker.docker_runner import LABEL_RUN

from .conftest import Fetch, StartWorker, body, run_job, submit, wait_result

MIB = 1024 * 1024


def worker_id(kind: str) -> str:
    return f"lim-{kind}-{uuid.uuid4().hex[:6]}"


async def start(start_worker: StartWorker, kind: str, **kw: Any) -> Agent:
    kw.setdefault("network", "none")
    return await start_worker(worker_id(kind), **kw)


def values(logs: str) -> dict[str, str]:
    """``name=value`` lines of a job's log."""
    return dict(re.findall(r"^(\w+)=(.*)$", logs, re.MULTILINE))


async def finished(fetch: Fetch, answer: dict[str, Any], queue: str = "q") -> dict[str, Any]:
    return await wait_result(fetch, queue, answer["jobId"], timeout=60)


async def test_max_duration_and_the_workers_cap(
    fetch: Fetch, start_worker: StartWorker, test_images: Any
) -> None:
    await start(start_worker, "time", max_job_duration=4)
    began = time.monotonic()
    own = await submit(
        fetch, "q", {"image": test_images.busybox, "command": "sleep 30", "maxDuration": 2}
    )
    # No limit of its own: the worker's (the host gives a worker no job whose own limit is
    # longer than the worker's, so that is the only way the worker's cap applies).
    none = await submit(fetch, "q", {"image": test_images.busybox, "command": "sleep 31"})
    results = [await finished(fetch, a) for a in (own, none)]
    elapsed = time.monotonic() - began
    for result, limit in zip(results, (2, 4), strict=True):
        assert result["reason"] == "TimedOut", result
        assert result["message"] and f"{limit} s" in result["message"], result
    assert elapsed < 20, elapsed  # stopped at the limits (2 s, 4 s), far before 30 s


async def test_memory_limits(fetch: Fetch, start_worker: StartWorker, test_images: Any) -> None:
    # The worker's --memory is both its capacity and the limit of jobs that name none
    # (jupyter_compute_queue.worker.main passes it to Resources and to RunnerConfig).
    await start(start_worker, "mem", memory=64 * MIB, default_memory=64 * MIB)
    hog = await submit(
        fetch,
        "q",
        {
            "image": test_images.python,
            "command": ["python3", "-c", "b = b'x' * (200 * 1024 * 1024); print('survived')"],
            "requirements": {"memory": "32m"},
        },
    )
    plain = await submit(
        fetch,
        "q",
        {
            "image": test_images.busybox,
            "command": "echo limit=$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes)",
        },
    )
    result = await finished(fetch, hog)
    logs = (await fetch("q", "q", "j", hog["jobId"], "logs")).body.decode()
    assert result["reason"] == "Failed" and result["exitCode"] == 137, (result, logs)
    assert "memory" in result["message"], result
    assert "survived" not in logs
    result = await finished(fetch, plain)
    logs = (await fetch("q", "q", "j", plain["jobId"], "logs")).body.decode()
    assert result["reason"] == "Success", (result, logs)
    assert values(logs)["limit"] == str(64 * MIB), logs


async def test_cpus_pids_shm_and_init(
    fetch: Fetch, start_worker: StartWorker, test_images: Any
) -> None:
    await start(start_worker, "cpu")
    script = "; ".join(
        [
            "echo quota=$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us)",
            "echo period=$(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us)",
            "echo pids=$(cat /sys/fs/cgroup/pids/pids.max)",
            "echo shm=$(df -k /dev/shm | tail -n 1 | tr -s ' ' | cut -d ' ' -f 2)",
            "echo init=$(cat /proc/1/comm)",
        ]
    )
    result, logs = await run_job(
        fetch,
        {
            "image": test_images.busybox,
            "command": script,
            "requirements": {"cpus": 0.5},
            "shmSize": "100m",
        },
    )
    assert result["reason"] == "Success", (result, logs)
    got = values(logs)
    assert int(got["quota"]) / int(got["period"]) == 0.5, got
    assert got["pids"] == "4096", got
    assert got["shm"] == str(100 * 1024), got  # KiB
    assert got["init"] in ("docker-init", "tini"), got
    # A job that names no cpus is counted as 1 CPU, and limited to it.
    result, logs = await run_job(fetch, {"image": test_images.busybox, "command": script})
    assert result["reason"] == "Success", (result, logs)
    got = values(logs)
    assert int(got["quota"]) / int(got["period"]) == 1, got


FORK_BOMB = """
import errno, os, signal
children, error = [], "none"
while len(children) < 1000:
    try:
        pid = os.fork()
    except OSError as exc:
        error = errno.errorcode.get(exc.errno, str(exc.errno))
        break
    if pid == 0:
        signal.pause()  # hold the pid until killed
        os._exit(0)
    children.append(pid)
print("forked=%d" % len(children))
print("error=" + error)
for pid in children:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
print("cleaned=yes")
"""


async def test_a_fork_bomb_stops_at_the_pids_limit(
    fetch: Fetch, start_worker: StartWorker, test_images: Any
) -> None:
    limit = 64
    await start(start_worker, "pids", pids_limit=limit)
    job = {"image": test_images.python, "command": ["python3", "-c", FORK_BOMB]}
    result, logs = await run_job(fetch, job)
    assert result["reason"] == "Success", (result, logs)
    got = values(logs)
    assert got["error"] == "EAGAIN", logs  # the kernel refused the fork at the limit
    # The init and python hold two of the pids; the bomb stopped at the limit, not before.
    assert limit - 4 <= int(got["forked"]) <= limit - 2, logs
    assert got["cleaned"] == "yes", logs


CPU_BURN = """
import os, time
def read(*paths):
    for path in paths:
        if os.path.exists(path):
            return dict(line.split() for line in open(path))
stat_files = ("/sys/fs/cgroup/cpu/cpu.stat", "/sys/fs/cgroup/cpu,cpuacct/cpu.stat",
              "/sys/fs/cgroup/cpu.stat")
before = read(*stat_files)
wall, cpu = time.monotonic(), time.process_time()
while time.monotonic() - wall < 2.0:
    pass
print("ratio=%.3f" % ((time.process_time() - cpu) / (time.monotonic() - wall)))
after = read(*stat_files)
print("throttled=%d" % (int(after["nr_throttled"]) - int(before["nr_throttled"])))
"""


async def test_a_busy_job_gets_its_cpu_quota_and_no_more(
    fetch: Fetch, start_worker: StartWorker, test_images: Any
) -> None:
    """The quota is not only set (test_cpus_pids_shm_and_init) but enforced: a job that spins
    for two seconds with ``cpus: 0.5`` gets about one second of CPU, and the kernel throttled
    it (the cgroup's cpu.stat, v1 or v2)."""
    await start(start_worker, "burn")
    job = {
        "image": test_images.python,
        "command": ["python3", "-c", CPU_BURN],
        "requirements": {"cpus": 0.5},
    }
    result, logs = await run_job(fetch, job)
    assert result["reason"] == "Success", (result, logs)
    got = values(logs)
    # At most the quota (a period's slack); other load on the machine can only lower it.
    assert float(got["ratio"]) <= 0.6, logs
    # Up to 20 periods of 100 ms were cut short. A job that got close to its quota was cut
    # short in some; one that the machine's other load kept well under it never reached it
    # (seen at load 13 on 2 cores: ratio 0.13, none throttled), so there is nothing to see.
    if float(got["ratio"]) >= 0.35:
        assert int(got["throttled"]) >= 1, logs


async def test_output_cap(fetch: Fetch, start_worker: StartWorker, test_images: Any) -> None:
    cap = 1_000_000
    await start(start_worker, "out", max_output_bytes=cap, output_poll_seconds=0.2)
    slow = (
        "for i in $(seq 50); do dd if=/dev/zero of=/outputs/f$i bs=100k count=1 2>/dev/null;"
        " echo wrote=$i; sleep 0.2; done; echo finished=yes"
    )
    result, logs = await run_job(fetch, {"image": test_images.busybox, "command": slow})
    assert result["reason"] == "Error", (result, logs)
    assert str(cap) in result["message"], result
    assert "finished=yes" not in logs
    assert int(re.findall(r"wrote=(\d+)", logs)[-1]) < 40, logs  # stopped soon after the cap
    assert sum(o["size"] for o in result["outputs"].values()) <= cap, result


async def test_output_cap_of_a_job_that_ends_between_samples(
    fetch: Fetch, start_worker: StartWorker, test_images: Any
) -> None:
    """Written and gone before the first sample: the cap still holds for the upload."""
    cap = 1_000_000
    await start(start_worker, "fast", max_output_bytes=cap, output_poll_seconds=30)
    fast = "dd if=/dev/zero of=/outputs/big bs=1M count=3 2>/dev/null; echo small > /outputs/s"
    result, logs = await run_job(fetch, {"image": test_images.busybox, "command": fast})
    assert result["reason"] == "Error", (result, logs)
    assert str(cap) in result["message"], result
    assert result["outputs"] == {}, result


async def test_cancel_removes_the_container(
    fetch: Fetch, start_worker: StartWorker, test_images: Any
) -> None:
    client = docker.from_env()
    await start(start_worker, "cancel")
    answer = await submit(fetch, "q", {"image": test_images.busybox, "command": "sleep 60"})
    record = await wait_result(fetch, "q", answer["jobId"], timeout=30, state="Running")
    label = {"label": f"{LABEL_RUN}={record['runId']}"}
    deadline = time.monotonic() + 30
    while not client.containers.list(sparse=True, filters=label) or (
        body(await fetch("q", "q", "j", answer["jobId"], "result.json")).get("phase") != "running"
    ):
        assert time.monotonic() < deadline, "the container never ran"
        await asyncio.sleep(0.1)
    cancelled = await fetch("q", "q", "j", answer["jobId"], "cancel", method="POST", body=b"")
    assert cancelled.code == 200 and body(cancelled)["changed"] is True, cancelled.body
    began = time.monotonic()
    while client.containers.list(all=True, sparse=True, filters=label):
        assert time.monotonic() - began < 10, "the container outlived its cancel"
        await asyncio.sleep(0.1)
    result = await wait_result(fetch, "q", answer["jobId"], timeout=10)
    assert result["reason"] == "Cancelled", result


async def test_job_cache_is_per_queue(
    fetch: Fetch, start_worker: StartWorker, test_images: Any
) -> None:
    await start(start_worker, "cache", queues=("q", "r"))
    token = uuid.uuid4().hex
    image = test_images.busybox
    result, logs = await run_job(fetch, {"image": image, "command": f"echo {token} > $JOB_CACHE/m"})
    assert result["reason"] == "Success", (result, logs)
    read = "echo seen=$(cat /job-cache/m)"
    result, logs = await run_job(fetch, {"image": image, "command": read})
    assert result["reason"] == "Success" and values(logs)["seen"] == token, (result, logs)
    result, logs = await run_job(
        fetch, {"image": image, "command": "echo listed=$(ls -A /job-cache | wc -l)"}, queue="r"
    )
    assert result["reason"] == "Success" and values(logs)["listed"] == "0", (result, logs)
