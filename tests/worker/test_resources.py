"""The worker's resource accounting: GPU specs, device requests, allocation (SPEC §5, §6)."""

from __future__ import annotations

import asyncio
import random
import shlex
import stat
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from jupyter_compute_queue.model.capacity import Capacity
from jupyter_compute_queue.worker.resources import (
    Allocation,
    ResourceError,
    Resources,
    cuda_visible_devices,
    docker_device_request,
    gpu_device_request,
    parse_gpus,
)

GIB = 1024**3

# There is no GPU on the machines that run these tests: each fake below is a shell script that
# stands in for the real `nvidia-smi -L`, printing what the NVIDIA tool prints (or failing as it
# fails), so `--gpus all` is exercised end to end without a driver.
THREE_GPUS = """\
GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-6a1b3c1e-0f61-4d7e-9a3c-1f2e3d4c5b6a)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-7b2c4d2f-1a72-4e8f-8b4d-2a3f4e5d6c7b)
  MIG 1g.5gb      Device  0: (UUID: MIG-8c3d5e3a-2b83-4f9a-9c5e-3b4a5f6e7d8c)
GPU 2: NVIDIA A100-SXM4-40GB (UUID: GPU-9d4e6f4b-3c94-4a0b-8d6f-4c5b6a7f8e9d)
"""


def fake_tool(folder: Path, body: str, name: str = "nvidia-smi") -> Path:
    """An executable shell script ``folder/name`` running ``body``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def listing_tool(folder: Path, listing: str = THREE_GPUS) -> Path:
    """A fake nvidia-smi that prints ``listing`` for ``-L`` and refuses anything else.

    Only shell builtins, so it also runs with PATH narrowed to the fake's own folder.
    """
    lines = "".join(f"printf '%s\\n' {shlex.quote(line)}\n" for line in listing.splitlines())
    return fake_tool(folder, f'[ "$1" = "-L" ] || exit 2\n{lines}')


# --- parse_gpus ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, ()),
        (0, ()),
        ("0", ()),
        (2, (0, 1)),
        ("2", (0, 1)),
        (" 3 ", (0, 1, 2)),
        ("device=1,3", (1, 3)),
        ("device=3,1,3", (1, 3)),
        ("device=0", (0,)),
        ("device= 2 , 0", (0, 2)),
    ],
)
def test_parse_gpus(spec: str | int | None, expected: tuple[int, ...]) -> None:
    assert parse_gpus(spec) == expected


@pytest.mark.parametrize(
    "spec", ["two", "device=", "device=-1", "-1", -1, "device=1,,3", "device=a", "", "1.5", True]
)
def test_parse_gpus_refuses_bad_specs(spec: str | int) -> None:
    with pytest.raises(ResourceError) as info:
        parse_gpus(spec)
    message = str(info.value)
    assert repr(spec) in message
    assert "device=1,3" in message  # says what is accepted


def test_parse_gpus_all_counts_with_nvidia_smi(tmp_path: Path) -> None:
    tool = listing_tool(tmp_path)
    assert parse_gpus("all", nvidia_smi=str(tool)) == (0, 1, 2)
    assert parse_gpus("ALL", nvidia_smi=str(tool)) == (0, 1, 2)


def test_parse_gpus_all_finds_nvidia_smi_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listing_tool(tmp_path / "bin")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert parse_gpus("all") == (0, 1, 2)


def test_parse_gpus_all_without_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no nvidia-smi anywhere
    with pytest.raises(ResourceError, match=r"'nvidia-smi', which was not found"):
        parse_gpus("all")
    missing = tmp_path / "nope" / "nvidia-smi"
    with pytest.raises(ResourceError, match="not found"):
        parse_gpus("all", nvidia_smi=str(missing))


def test_parse_gpus_all_when_nvidia_smi_fails(tmp_path: Path) -> None:
    # What nvidia-smi does on a host whose driver is not loaded: a message on stdout, exit 9.
    tool = fake_tool(
        tmp_path,
        'echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver."\n'
        "exit 9\n",
    )
    with pytest.raises(ResourceError) as info:
        parse_gpus("all", nvidia_smi=str(tool))
    message = str(info.value)
    assert "exit code 9" in message
    assert "couldn't communicate with the NVIDIA driver" in message


def test_parse_gpus_all_when_nvidia_smi_lists_nothing(tmp_path: Path) -> None:
    tool = listing_tool(tmp_path, listing="")
    with pytest.raises(ResourceError, match="lists no GPUs"):
        parse_gpus("all", nvidia_smi=str(tool))


def test_parse_gpus_all_when_nvidia_smi_hangs(tmp_path: Path) -> None:
    # exec: the timeout kills the sleeping process itself, which holds the output pipes.
    tool = fake_tool(tmp_path, "exec sleep 30\n")
    with pytest.raises(ResourceError, match=r"did not answer within 0\.2 s"):
        parse_gpus("all", nvidia_smi=str(tool), timeout=0.2)


def test_parse_gpus_all_when_nvidia_smi_is_not_executable(tmp_path: Path) -> None:
    tool = tmp_path / "nvidia-smi"
    tool.write_text("GPU 0: not a program\n")
    tool.chmod(0o644)
    with pytest.raises(ResourceError, match="could not be run"):
        parse_gpus("all", nvidia_smi=str(tool))


# --- device requests and CUDA_VISIBLE_DEVICES ---------------------------------------------


def test_gpu_device_request() -> None:
    assert gpu_device_request((1, 3)) == {
        "Driver": "nvidia",
        "DeviceIDs": ["1", "3"],
        "Capabilities": [["gpu"]],
    }


def test_docker_device_request_matches_what_docker_py_sends() -> None:
    from docker.types import DeviceRequest

    request = docker_device_request((1, 3))
    assert isinstance(request, DeviceRequest)
    # docker-py fills in its defaults for the fields we leave out; they ask for nothing more.
    assert dict(request) == {**gpu_device_request((1, 3)), "Count": 0, "Options": {}}
    direct = DeviceRequest(driver="nvidia", device_ids=["1", "3"], capabilities=[["gpu"]])
    assert dict(request) == dict(direct)


@pytest.mark.parametrize("indices", [(), (-1,), (True,)])
def test_device_requests_refuse_bad_indices(indices: tuple[int, ...]) -> None:
    with pytest.raises(ResourceError):
        gpu_device_request(indices)
    with pytest.raises(ResourceError):
        docker_device_request(indices)


def test_cuda_visible_devices() -> None:
    assert cuda_visible_devices(2) == "0,1"
    assert cuda_visible_devices(1) == "0"
    assert cuda_visible_devices(0) == ""
    with pytest.raises(ResourceError):
        cuda_visible_devices(-1)


# --- allocation ----------------------------------------------------------------------------


def test_total_and_free_of_an_idle_worker() -> None:
    res = Resources(cpus=8, memory=16 * GIB, gpus=[3, 1, 0, 2])
    assert res.total == Capacity(8.0, 16 * GIB, 4)
    assert res.free == res.total
    assert res.gpu_indices == (0, 1, 2, 3)
    assert res.held() == {}


def test_allocation_takes_the_lowest_free_gpus_and_release_returns_them() -> None:
    res = Resources(cpus=16, memory=None, gpus=[0, 1, 2, 3])
    a = res.allocate("a", cpus=1, memory=None, gpus=1)
    b = res.allocate("b", cpus=1, memory=None, gpus=2)
    assert (a.gpus, b.gpus) == ((0,), (1, 2))
    assert res.free_gpus == (3,)
    res.release("a")
    assert list(res.free_gpus) == [0, 3]  # a list: mypy keeps narrowing the tuple from above
    c = res.allocate("c", cpus=1, memory=None, gpus=2)
    assert c.gpus == (0, 3)  # lowest free indices, not necessarily contiguous
    assert res.free.gpus == 0
    res.release("b")
    res.release("c")
    assert res.free == res.total


def test_allocation_on_a_device_list_uses_host_indices() -> None:
    res = Resources(cpus=4, memory=None, gpus=parse_gpus("device=5,2"))
    assert res.allocate("a", cpus=1, memory=None, gpus=1).gpus == (2,)
    assert res.allocate("b", cpus=1, memory=None, gpus=1).gpus == (5,)


def test_allocation_defaults_match_the_host() -> None:
    res = Resources(cpus=4, memory=8 * GIB, gpus=[])
    allocation = res.allocate("a", cpus=None, memory=None, gpus=0)
    assert allocation == Allocation("a", 1.0, 0, ())
    assert res.free == Capacity(3.0, 8 * GIB, 0)


def test_memory_accounting() -> None:
    res = Resources(cpus=8, memory=4 * GIB, gpus=[])
    res.allocate("a", cpus=1, memory=3 * GIB, gpus=0)
    assert res.free.memory == 1 * GIB
    with pytest.raises(ResourceError, match="memory"):
        res.allocate("b", cpus=1, memory=2 * GIB, gpus=0)
    res.allocate("b", cpus=1, memory=1 * GIB, gpus=0)
    assert res.free.memory == 0
    res.release("a")
    assert res.free.memory == 3 * GIB


def test_unaccounted_memory_never_refuses() -> None:
    res = Resources(cpus=8, memory=None, gpus=[])
    allocation = res.allocate("a", cpus=1, memory=10**15, gpus=0)
    assert allocation.memory == 10**15  # recorded, but not counted against anything
    assert res.free.memory is None


def test_fractional_cpus_return_to_exactly_the_total() -> None:
    res = Resources(cpus=1, memory=None, gpus=[])
    for i in range(10):
        res.allocate(f"r{i}", cpus=0.1, memory=None, gpus=0)
    assert res.free.cpus == pytest.approx(0.0, abs=1e-9)
    for i in range(10):
        res.release(f"r{i}")
    assert res.free.cpus == 1.0


@pytest.mark.parametrize(
    ("cpus", "memory", "gpus"), [(5, None, 0), (1, 3 * GIB, 0), (1, None, 3), (4.5, None, 0)]
)
def test_a_run_that_does_not_fit_is_refused_and_takes_nothing(
    cpus: float, memory: int | None, gpus: int
) -> None:
    res = Resources(cpus=4, memory=2 * GIB, gpus=[0, 1])
    with pytest.raises(ResourceError, match="the host assigns only runs that fit") as info:
        res.allocate("big", cpus=cpus, memory=memory, gpus=gpus)
    assert "'big'" in str(info.value)
    assert res.held() == {}
    assert res.free == res.total


def test_gpus_on_a_worker_without_gpus_are_refused() -> None:
    res = Resources(cpus=4, memory=None, gpus=())
    with pytest.raises(ResourceError, match="gpus=1"):
        res.allocate("a", cpus=1, memory=None, gpus=1)


def test_a_second_allocate_for_the_same_run_is_refused() -> None:
    res = Resources(cpus=8, memory=None, gpus=[0, 1])
    first = res.allocate("a", cpus=1, memory=None, gpus=1)
    with pytest.raises(ResourceError, match="already holds"):
        res.allocate("a", cpus=1, memory=None, gpus=1)
    assert res.held() == {"a": first}
    assert res.free_gpus == (1,)


def test_release_is_idempotent() -> None:
    res = Resources(cpus=8, memory=GIB, gpus=[0, 1])
    res.allocate("a", cpus=2, memory=GIB // 2, gpus=1)
    res.allocate("b", cpus=2, memory=GIB // 4, gpus=1)
    res.release("a")
    res.release("a")
    res.release("never-allocated")
    assert set(res.held()) == {"b"}
    assert res.free == Capacity(6.0, GIB - GIB // 4, 1)
    assert res.free_gpus == (0,)


def test_held_is_a_copy() -> None:
    res = Resources(cpus=2, memory=None, gpus=[])
    res.allocate("a", cpus=1, memory=None, gpus=0)
    res.held().clear()
    assert set(res.held()) == {"a"}


@pytest.mark.parametrize(
    ("cpus", "memory", "gpus"),
    [(-1, None, 0), (float("nan"), None, 0), (1, -1, 0), (1, None, -1), (1, None, True)],
)
def test_malformed_requests_are_refused(cpus: float, memory: int | None, gpus: int) -> None:
    res = Resources(cpus=4, memory=GIB, gpus=[0])
    with pytest.raises(ResourceError, match="'a'"):
        res.allocate("a", cpus=cpus, memory=memory, gpus=gpus)
    assert res.held() == {}


@pytest.mark.parametrize(
    ("cpus", "memory", "gpus"),
    [(0, None, []), (float("inf"), None, []), (1, -1, []), (1, None, [0, 0]), (1, None, [-1])],
)
def test_malformed_capacity_is_refused(cpus: float, memory: int | None, gpus: list[int]) -> None:
    with pytest.raises(ResourceError):
        Resources(cpus=cpus, memory=memory, gpus=gpus)


# --- invariants under interleaving ---------------------------------------------------------


def check_consistent(res: Resources) -> None:
    """No GPU held twice, held + free = total, and ``free`` = total - held."""
    held = res.held()
    taken = [i for a in held.values() for i in a.gpus]
    assert len(taken) == len(set(taken)), f"a GPU is held twice: {held}"
    assert set(taken).isdisjoint(res.free_gpus)
    assert sorted([*taken, *res.free_gpus]) == list(res.gpu_indices)
    total, free = res.total, res.free
    assert free.gpus == total.gpus - len(taken)
    assert free.cpus == pytest.approx(total.cpus - sum(a.cpus for a in held.values()), abs=1e-9)
    assert free.cpus >= 0
    if total.memory is None:
        assert free.memory is None
    else:
        assert free.memory == total.memory - sum(a.memory for a in held.values())
        assert free.memory >= 0


async def test_concurrent_runs_never_share_a_gpu() -> None:
    res = Resources(cpus=6, memory=8 * GIB, gpus=[0, 1, 2, 3])
    rng = random.Random(20240601)
    owner: dict[int, str] = {}  # the test's own record of who holds each GPU
    refused = 0
    peak = 0

    async def run(n: int) -> None:
        nonlocal refused, peak
        run_id = f"run-{n}"
        gpus = rng.choice([0, 0, 1, 1, 2, 3, 4])
        cpus = rng.choice([None, 0.5, 1, 2])
        memory = rng.choice([None, GIB, 2 * GIB])
        for _ in range(rng.randrange(3)):
            await asyncio.sleep(0)
        while True:
            # Some tasks ask blindly (and are refused when full, taking nothing), some ask only
            # when `free` says it fits, as the host would.
            if n % 2 and not res.free.fits(cpus or 1.0, memory or 0, gpus):
                await asyncio.sleep(0)
                continue
            try:
                allocation = res.allocate(run_id, cpus, memory, gpus)
            except ResourceError:
                refused += 1
                check_consistent(res)
                await asyncio.sleep(0)
                continue
            break
        assert len(allocation.gpus) == gpus
        for index in allocation.gpus:
            assert index not in owner, f"GPU {index} given to {run_id} and {owner.get(index)}"
            owner[index] = run_id
        peak = max(peak, len(res.held()))
        check_consistent(res)
        for _ in range(rng.randrange(1, 6)):
            await asyncio.sleep(0)
            assert all(owner[index] == run_id for index in allocation.gpus)
        for index in allocation.gpus:
            del owner[index]
        res.release(run_id)
        check_consistent(res)
        await asyncio.sleep(0)
        res.release(run_id)  # a second path ending the same run

    await asyncio.wait_for(asyncio.gather(*(run(n) for n in range(200))), timeout=60)
    assert owner == {}
    assert res.held() == {}
    assert res.free == res.total
    assert refused > 0 and peak > 1  # the runs really did contend


class AllocationMachine(RuleBasedStateMachine):
    """Random allocate/release sequences against a simple model of what should be free."""

    def __init__(self) -> None:
        super().__init__()
        self.res = Resources(cpus=4, memory=4 * GIB, gpus=[0, 2, 3, 7])
        self.model: dict[str, tuple[float, int, int]] = {}  # run -> (cpus, memory, gpus)

    def model_fits(self, cpus: float, memory: int, gpus: int) -> bool:
        used_cpus = sum(c for c, _, _ in self.model.values())
        used_memory = sum(m for _, m, _ in self.model.values())
        used_gpus = sum(g for _, _, g in self.model.values())
        return (
            used_cpus + cpus <= 4 + 1e-9
            and used_memory + memory <= 4 * GIB
            and used_gpus + gpus <= 4
        )

    @rule(
        run_id=st.sampled_from([f"r{i}" for i in range(8)]),
        cpus=st.one_of(st.none(), st.sampled_from([0, 0.25, 0.5, 1, 1.5, 2, 3])),
        memory=st.one_of(st.none(), st.sampled_from([0, GIB // 2, GIB, 3 * GIB])),
        gpus=st.integers(0, 5),
    )
    def allocate(self, run_id: str, cpus: float | None, memory: int | None, gpus: int) -> None:
        need = (1.0 if cpus is None else float(cpus), memory or 0, gpus)
        free_before = self.res.free_gpus
        if run_id in self.model or not self.model_fits(*need):
            with pytest.raises(ResourceError):
                self.res.allocate(run_id, cpus, memory, gpus)
            return
        allocation = self.res.allocate(run_id, cpus, memory, gpus)
        assert allocation.gpus == free_before[:gpus]  # the lowest free indices
        assert (allocation.cpus, allocation.memory) == need[:2]
        self.model[run_id] = need

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def release_held(self, data: st.DataObject) -> None:
        run_id = data.draw(st.sampled_from(sorted(self.model)))
        self.res.release(run_id)
        del self.model[run_id]

    @rule(run_id=st.sampled_from([f"r{i}" for i in range(8)]))
    def release_any(self, run_id: str) -> None:
        self.res.release(run_id)  # idempotent: may name a run that holds nothing
        self.model.pop(run_id, None)

    @invariant()
    def consistent(self) -> None:
        check_consistent(self.res)
        assert set(self.res.held()) == set(self.model)
        if not self.model:
            assert self.res.free == self.res.total


TestAllocationMachine = AllocationMachine.TestCase
TestAllocationMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
