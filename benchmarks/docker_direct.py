"""The baseline of the container benchmarks: the Docker SDK running the container directly,
with the options the worker gives a job's container (``DockerRunner._create``): an init
process, no network (the worker runs with ``--network none``), the job's cpu and memory limits,
shm size, a pids limit, ``no-new-privileges``, the worker's uid:gid. The worker's bind mounts
(/inputs, /outputs, /job-cache), labels and ``JOB_*`` environment are the worker's own work
and not part of the baseline."""

from __future__ import annotations

import os
import time
from typing import Any

from .common import BUSYBOX

#: The job the container benchmarks submit, and the limits both sides apply.
CPUS = 1
MEMORY = 256 * 1024**2
SHM = 64 * 1024**2
PIDS = 4096


def definition(command: list[str]) -> dict[str, Any]:
    return {
        "image": BUSYBOX,
        "command": command,
        "requirements": {"cpus": CPUS, "memory": MEMORY},
    }


def client() -> Any:
    import docker

    return docker.from_env()


def create(docker_client: Any, command: list[str], labels: dict[str, str] | None = None) -> Any:
    return docker_client.containers.create(
        BUSYBOX,
        command=command,
        init=True,
        network_mode="none",
        nano_cpus=int(CPUS * 1e9),
        mem_limit=MEMORY,
        memswap_limit=MEMORY,
        shm_size=SHM,
        pids_limit=PIDS,
        security_opt=["no-new-privileges"],
        privileged=False,
        user=f"{os.getuid()}:{os.getgid()}",
        labels=labels or {},
        detach=True,
    )


def run_true(docker_client: Any) -> float:
    """create + start + wait + remove of ``true``: seconds."""
    start = time.perf_counter()
    container = create(docker_client, ["true"])
    container.start()
    container.wait()
    container.remove(force=True)
    return time.perf_counter() - start
