"""A job cannot fill the worker's disk outside ``/outputs`` either (SPEC §6): what it writes to
its container's own files (``/tmp``), ``/inputs`` and ``/job-cache`` counts against the
worker's ``max_disk_bytes``, checked from inside real containers.

Caps are a few MB so the jobs run fast; workers use ``network="none"`` (no Docker network)."""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import Any

from jupyter_compute_queue.worker.disk import DiskUse, over_caps

from .conftest import Fetch, StartWorker, run_job, submit, wait_result

CAP = 5_000_000
MB = 1024 * 1024


def fast_polls(**config: Any) -> dict[str, Any]:
    return {
        "network": "none",
        "max_output_bytes": CAP,
        "max_disk_bytes": CAP,
        "output_poll_seconds": 0.2,
        "disk_poll_seconds": 0.5,
        **config,
    }


PLACES = {
    "tmp": "in the container's own files (/tmp",
    "inputs": "more in /inputs",
    "cache": "more in the queue's /job-cache",
}


def where(message: str) -> list[tuple[int, str]]:
    """The (bytes, place) parts of a disk cap message."""
    listed = message.split(" bytes per run: ", 1)[1]
    return [(int(size), place) for size, place in (p.split(" ", 1) for p in listed.split(", "))]


def write(path: str, megabytes: float) -> str:
    return f"dd if=/dev/zero of={path} bs=1k count={int(megabytes * 1024)} 2>/dev/null"


async def test_writing_past_the_disk_cap_anywhere_stops_the_job(
    fetch: Fetch, start_worker: StartWorker, test_images: Any
) -> None:
    """Each place on its own queue: runs of one queue share its /job-cache, whose growth each
    of them is counted. One at a time (``cpus=1``): a running container holds two threads of
    the test's event loop's small default pool, which tornado's resolver needs too."""
    places = {"tmp": "/tmp/big", "inputs": "/inputs/big", "cache": "/job-cache/big"}
    await start_worker(f"disk-{uuid.uuid4().hex[:6]}", queues=tuple(places), cpus=1, **fast_polls())
    began = time.monotonic()
    jobs = {}
    for queue, path in places.items():
        # Then it waits to be stopped: only the sampler can end it early.
        command = f"{write(path, 8)}; echo wrote=yes; sleep 120; echo finished=yes"
        jobs[queue] = await submit(fetch, queue, {"image": test_images.busybox, "command": command})
    for queue, answer in jobs.items():
        result = await wait_result(fetch, queue, answer["jobId"], timeout=90)
        logs = (await fetch("q", queue, "j", answer["jobId"], "logs")).body.decode()
        assert result["reason"] == "Error", (queue, result, logs)
        message = result["message"]
        assert f"cap of {CAP} bytes per run" in message, message
        assert "wrote=yes" in logs and "finished=yes" not in logs, logs
        assert f"stopping the container: {message}" in logs, logs
        # Largest first: the 8 MiB where the job wrote them, then at most a few bytes elsewhere.
        (size, place), *others = where(message)
        assert place.startswith(PLACES[queue]) and size >= 8 * MB, message
        assert all(size < MB for size, _ in others), message
    assert time.monotonic() - began < 60  # stopped, not timed out after 120 s


async def test_a_job_that_writes_and_exits_between_samples(
    fetch: Fetch, start_worker: StartWorker, test_images: Any
) -> None:
    """The layer is measured every 30 s here, so only the check after the exit sees it."""
    await start_worker(f"diskx-{uuid.uuid4().hex[:6]}", **fast_polls(disk_poll_seconds=30))
    command = f"{write('/tmp/big', 8)}; echo small > /outputs/s"
    result, logs = await run_job(fetch, {"image": test_images.busybox, "command": command})
    assert result["reason"] == "Error", (result, logs)
    assert f"cap of {CAP} bytes" in result["message"] and "/tmp" in result["message"], result
    assert result["outputs"] == {}, result  # nothing uploaded


async def test_a_job_within_the_disk_cap_succeeds(
    fetch: Fetch, start_worker: StartWorker, test_images: Any
) -> None:
    """Nearly a megabyte in each place (under 5 MB in all), and still running at a few slow
    samples; its inputs (2 MB here) are the run's own, not something it wrote."""
    await start_worker(f"diskok-{uuid.uuid4().hex[:6]}", **fast_polls())
    data = b"i" * (2 * MB)
    key = hashlib.sha256(data).hexdigest()
    assert (await fetch("f", key, method="PUT", body=data)).code == 201
    command = "; ".join(
        [
            write("/tmp/a", 0.9),
            write("/inputs/a", 0.9),
            write("/job-cache/a", 0.9),
            write("/outputs/a", 0.9),
            "sleep 1.5",
            "echo done=yes",
        ]
    )
    definition = {
        "image": test_images.busybox,
        "command": command,
        "inputs": {"given.bin": {"type": "key", "value": key}},
    }
    result, logs = await run_job(fetch, definition)
    assert result["reason"] == "Success", (result, logs)
    assert "done=yes" in logs
    assert result["outputs"]["a"]["size"] == int(0.9 * 1024) * 1024, result


def test_the_message_names_each_place_and_the_cap() -> None:
    use = DiskUse(outputs=10, inputs=0, layer=3_000, job_cache=2_000)
    assert use.total == 5_010
    assert over_caps(use, max_output_bytes=100, max_disk_bytes=6_000) is None
    assert over_caps(use, max_output_bytes=5, max_disk_bytes=6_000) == (
        "/outputs grew past the cap of 5 bytes (10)"
    )
    assert over_caps(use, max_output_bytes=100, max_disk_bytes=5_000) == (
        "wrote 5010 bytes to the worker's disk, past the worker's cap of 5000 bytes per run:"
        " 3000 in the container's own files (/tmp and every path outside the mounts), 2000 more"
        " in the queue's /job-cache, 10 in /outputs"
    )
