"""GPU jobs (SPEC §6 "GPUs"): which GPUs a run gets and exactly what the container is created with.

There is no GPU (and no nvidia runtime) on the test machine, so these are unit tests of
``parse_gpus``, ``Resources`` and ``DockerRunner._create``: ``FakeDocker`` stands in for a Docker
engine on a host with NVIDIA GPUs and records the arguments of ``containers.create``, which is
the whole of what the worker tells such an engine about a run's GPUs.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Literal

import pytest
from docker.types import DeviceRequest

from jupyter_compute_queue.model.jobs import parse_definition
from jupyter_compute_queue.worker.docker_runner import DockerRunner, Run, RunnerConfig
from jupyter_compute_queue.worker.prepare import RunFolder
from jupyter_compute_queue.worker.resources import ResourceError, Resources, parse_gpus
from jupyter_compute_queue.worker.transfer import ContentCache, Transfers

HOST_API = "http://127.0.0.1:9/compute-queue/"


class FakeContainers:
    def __init__(self) -> None:
        self.created: list[dict[str, Any]] = []

    def create(self, image: str, **kwargs: Any) -> object:
        self.created.append({"image": image, **kwargs})
        return object()


class FakeNetworks:
    def __init__(self) -> None:
        self.names: set[str] = set()

    def list(self, names: list[str]) -> list[str]:
        return [name for name in names if name in self.names]

    def create(self, name: str, **kwargs: Any) -> None:
        self.names.add(name)


class FakeDocker:
    """Stands in for the Docker engine of a GPU host: records what containers are created with."""

    def __init__(self) -> None:
        self.containers = FakeContainers()
        self.networks = FakeNetworks()


@pytest.fixture
def fake_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An ``nvidia-smi`` first on PATH whose ``-L`` lists three GPUs (and a MIG instance)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        '[ "$1" = "-L" ] || exit 2\n'
        "echo 'GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-aaaa)'\n"
        "echo 'GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-bbbb)'\n"
        "echo '  MIG 1g.5gb Device 0: (UUID: MIG-cccc)'\n"
        "echo 'GPU 2: NVIDIA A100-SXM4-40GB (UUID: GPU-dddd)'\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return script


class Worker:
    """A worker's GPU accounting and its runner, driven the way the agent drives them."""

    def __init__(
        self, tmp_path: Path, gpus: str, network: Literal["bridge", "none"] = "bridge"
    ) -> None:
        self.docker = FakeDocker()
        self.resources = Resources(8, None, parse_gpus(gpus))
        data = tmp_path / "worker"
        self.runner = DockerRunner(
            self.docker,
            RunnerConfig(data_dir=data, worker_id="gpu-worker", network=network),
            Transfers(HOST_API, "token", ContentCache(data / "cache")),
            HOST_API,
        )
        self.tmp_path = tmp_path

    def create(self, run_id: str, definition: dict[str, Any]) -> dict[str, Any]:
        """Allocate like the agent and create the run's container; its create arguments."""
        parsed = parse_definition(definition)
        allocation = self.resources.allocate(run_id, parsed.cpus, parsed.memory, parsed.gpus)
        run = Run(
            run_id=run_id,
            job_id="a" * 64,
            queue="gpu",
            fence=1,
            definition=parsed,
            blobs={},
            job_url=f"{HOST_API}q/gpu/j/{'a' * 64}",
            allocation=allocation,
        )
        folder = RunFolder(self.tmp_path / "runs" / run_id)
        folder.inputs.mkdir(parents=True)
        folder.outputs.mkdir()
        self.runner._create(run, "sha256:" + "0" * 64, folder)
        return self.docker.containers.created[-1]


def gpu_job(gpus: int, **extra: Any) -> dict[str, Any]:
    return {"image": "cuda:test", "command": "nvidia-smi", "requirements": {"gpus": gpus}, **extra}


def expected_request(ids: list[str]) -> dict[str, Any]:
    """The API's device request for these host GPUs (docker-py adds Count 0 and no Options)."""
    return {
        "Driver": "nvidia",
        "DeviceIDs": ids,
        "Capabilities": [["gpu"]],
        "Count": 0,
        "Options": {},
    }


def test_parse_gpus_reads_the_three_spellings(fake_nvidia_smi: Path) -> None:
    assert parse_gpus("2") == (0, 1)
    assert parse_gpus("all") == (0, 1, 2)  # the MIG line is not a device index
    assert parse_gpus("device=1,3") == (1, 3)
    assert parse_gpus(None) == () and parse_gpus("0") == ()


@pytest.mark.parametrize(
    ("spec", "ids"),
    [("2", ["0", "1"]), ("all", ["0", "1"]), ("device=1,3", ["1", "3"])],
)
def test_a_gpu_job_gets_a_device_request_and_cuda_visible_devices(
    tmp_path: Path, fake_nvidia_smi: Path, spec: str, ids: list[str]
) -> None:
    worker = Worker(tmp_path, spec)
    kwargs = worker.create("run-1", gpu_job(2))
    requests = kwargs["device_requests"]
    assert isinstance(requests, list) and len(requests) == 1
    (request,) = requests
    assert isinstance(request, DeviceRequest)
    assert dict(request) == expected_request(ids)
    # Inside the container the GPUs are renumbered from 0: never the host indices.
    assert kwargs["environment"]["CUDA_VISIBLE_DEVICES"] == "0,1"
    # Nothing else hands the container devices or privileges.
    assert kwargs["privileged"] is False
    assert "devices" not in kwargs and "runtime" not in kwargs
    assert worker.resources.free_gpus == tuple(i for i in parse_gpus(spec) if str(i) not in ids)


def test_a_job_without_gpus_gets_none(tmp_path: Path, fake_nvidia_smi: Path) -> None:
    worker = Worker(tmp_path, "all")
    for run_id, definition in [
        ("no-requirements", {"image": "cuda:test", "command": "true"}),
        ("zero-gpus", gpu_job(0)),
    ]:
        kwargs = worker.create(run_id, definition)
        assert not kwargs.get("device_requests"), run_id
        assert "CUDA_VISIBLE_DEVICES" not in kwargs["environment"], run_id
    assert worker.resources.free_gpus == (0, 1, 2)


def test_the_user_cannot_pick_host_gpus_through_env(tmp_path: Path) -> None:
    """A job's own CUDA_VISIBLE_DEVICES is replaced by the container-relative one."""
    worker = Worker(tmp_path, "device=1,3")
    kwargs = worker.create("run-1", gpu_job(1, env={"CUDA_VISIBLE_DEVICES": "3", "KEEP": "me"}))
    assert kwargs["environment"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert kwargs["environment"]["KEEP"] == "me"
    assert dict(kwargs["device_requests"][0])["DeviceIDs"] == ["1"]


def test_concurrent_gpu_jobs_get_the_lowest_free_indices_and_release_them(
    tmp_path: Path,
) -> None:
    worker = Worker(tmp_path, "device=1,3", network="none")
    first = worker.create("run-a", gpu_job(1))
    second = worker.create("run-b", gpu_job(1))
    assert dict(first["device_requests"][0]) == expected_request(["1"])
    assert dict(second["device_requests"][0]) == expected_request(["3"])
    assert first["environment"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert second["environment"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert not worker.resources.free_gpus and worker.resources.free.gpus == 0

    # Every GPU is held: a third GPU job does not fit (and takes nothing).
    with pytest.raises(ResourceError, match="gpus=1"):
        worker.create("run-c", gpu_job(1))
    assert set(worker.resources.held()) == {"run-a", "run-b"}

    # The end of a run gives its GPU back; the next job gets the lowest free one.
    worker.resources.release("run-a")
    assert list(worker.resources.free_gpus) == [1]
    third = worker.create("run-c", gpu_job(1))
    assert dict(third["device_requests"][0])["DeviceIDs"] == ["1"]
    worker.resources.release("run-b")
    worker.resources.release("run-c")
    worker.resources.release("run-c")  # a second release (cancel after exit) is harmless
    assert list(worker.resources.free_gpus) == [1, 3]
    both = worker.create("run-d", gpu_job(2))
    assert dict(both["device_requests"][0])["DeviceIDs"] == ["1", "3"]
    assert both["environment"]["CUDA_VISIBLE_DEVICES"] == "0,1"
