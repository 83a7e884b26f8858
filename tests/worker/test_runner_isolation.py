"""What a job's container cannot do or see (SPEC §6), checked from inside real containers.

Every worker here gets its own id (other suites on the same engine use ``w1``, and a worker
removes its id's leftover containers when it registers); the networks the workers make are
removed afterwards, so repeated runs do not use up the engine's address pools.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import os
import re
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from jupyter_compute_queue.worker.docker_runner import LABEL_RUN, LABEL_WORKER
from jupyter_compute_queue.worker.prepare import _force_remove

from .conftest import Fetch, StartWorker, remove_containers, run_job


def new_id(kind: str) -> str:
    return f"iso{kind}{uuid.uuid4().hex[:6]}"


def values(logs: str) -> dict[str, str]:
    """``name=value`` lines of a job's log."""
    return dict(re.findall(r"^(\w+)=(.*)$", logs, re.MULTILINE))


@pytest.fixture
def worker_ids(docker_engine: Any) -> Iterator[list[str]]:
    """Worker ids whose containers and networks are removed at the end (ask for this fixture
    before ``start_worker``, so that it ends after the workers)."""
    ids: list[str] = []
    yield ids
    client = docker.from_env()
    for worker in ids:
        remove_containers(client, worker)
        for network in client.networks.list(filters={"label": f"{LABEL_WORKER}={worker}"}):
            with contextlib.suppress(Exception):
                network.remove()


@pytest.fixture
def nobody_image(docker_engine: Any, test_images: Any) -> Iterator[str]:
    """The busybox image with ``USER 65534:65534``, built here and removed afterwards."""
    client = docker.from_env()
    tag = f"cq-test/busybox-nobody:{uuid.uuid4().hex[:8]}"
    dockerfile = f"FROM {test_images.busybox}\nUSER 65534:65534\n".encode()
    client.images.build(fileobj=io.BytesIO(dockerfile), tag=tag, rm=True, forcerm=True)
    yield tag
    with contextlib.suppress(Exception):
        client.images.remove(tag, force=True)


async def test_the_container_user(
    fetch: Fetch,
    worker_ids: list[str],
    start_worker: StartWorker,
    test_images: Any,
    nobody_image: str,
) -> None:
    worker_ids[:] = [new_id("u"), new_id("i")]
    await start_worker(worker_ids[0], queues=("q",), network="none")
    await start_worker(worker_ids[1], queues=("r",), network="none", container_user="image")
    command = "echo uid=$(id -u); echo gid=$(id -g)"
    expected = {
        # By default the worker's own uid:gid, whatever the image says.
        ("q", test_images.busybox): (os.getuid(), os.getgid()),
        ("q", nobody_image): (os.getuid(), os.getgid()),
        # With container_user="image": the image's user (root for busybox).
        ("r", test_images.busybox): (0, 0),
        ("r", nobody_image): (65534, 65534),
    }
    for (queue, image), (uid, gid) in expected.items():
        result, logs = await run_job(fetch, {"image": image, "command": command}, queue=queue)
        assert result["reason"] == "Success", (result, logs)
        got = values(logs)
        assert (got["uid"], got["gid"]) == (str(uid), str(gid)), (queue, image, logs)


async def test_no_privileges_socket_or_host_paths(
    fetch: Fetch, worker_ids: list[str], start_worker: StartWorker, test_images: Any, tmp_path: Path
) -> None:
    secret = f"cq-host-only-{uuid.uuid4().hex}"
    (tmp_path / secret).write_text("host secret\n")
    worker_ids.append(new_id("p"))
    await start_worker(worker_ids[0], network="none")
    script = "; ".join(
        [
            "echo nnp=$(grep NoNewPrivs /proc/self/status | tr -dc 0-9)",
            "mkdir -p /tmp/m",
            "mount -t tmpfs none /tmp/m 2>/dev/null && echo mount=done || echo mount=refused",
            "test -e /var/run/docker.sock && echo sock=there || echo sock=missing",
            "test -e /run/docker.sock && echo runsock=there || echo runsock=missing",
            f"cat {tmp_path / secret} >/dev/null 2>&1 && echo read=done || echo read=refused",
            f"echo found=$(find / -name {secret} 2>/dev/null | wc -l)",
            "cat /proc/mounts",
        ]
    )
    definition = {
        "image": test_images.busybox,
        "command": script,
        "configFiles": {"/etc/abs.cfg": {"type": "utf8", "value": "x\n"}},
    }
    result, logs = await run_job(fetch, definition)
    assert result["reason"] == "Success", (result, logs)
    got = values(logs)
    assert got["nnp"] == "1", logs
    assert got["mount"] == "refused", logs
    assert got["sock"] == "missing" and got["runsock"] == "missing", logs
    assert got["read"] == "refused", logs
    assert got["found"] == "0", logs
    system = ("/proc", "/sys", "/dev")
    engine = {"/", "/etc/resolv.conf", "/etc/hostname", "/etc/hosts", "/sbin/docker-init"}
    mounts = {
        line.split()[1]
        for line in logs.splitlines()
        if len(line.split()) == 6 and line.split()[1].startswith("/")
    }
    assert "/" in mounts, logs
    others = {m for m in mounts - engine if not m.startswith(system)}
    assert others == {"/inputs", "/outputs", "/job-cache", "/etc/abs.cfg"}, others


#: Docker's default capabilities (engine 20.10) less NET_RAW, which the runner drops: a root
#: job keeps at most these.
ROOT_CAPABILITIES = {
    "CHOWN": 0,
    "DAC_OVERRIDE": 1,
    "FOWNER": 3,
    "FSETID": 4,
    "KILL": 5,
    "SETGID": 6,
    "SETUID": 7,
    "SETPCAP": 8,
    "NET_BIND_SERVICE": 10,
    "SYS_CHROOT": 18,
    "MKNOD": 27,
    "AUDIT_WRITE": 29,
    "SETFCAP": 31,
}
CAP_NET_RAW = 13

PRIVILEGES = """
import os, subprocess
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
for name in ("CapEff", "CapPrm", "CapBnd", "NoNewPrivs"):
    print(name.lower() + "=" + status[name].strip())
euid = subprocess.run(
    ["/opt/suid/python", "-c", "import os; print(os.geteuid())"],
    capture_output=True, text=True,
).stdout.strip()
print("setuid_binary_euid=" + euid)
try:
    os.setuid(0)
    print("setuid=done")
except PermissionError:
    print("setuid=refused")
"""


@pytest.fixture
def setuid_image(docker_engine: Any, test_images: Any) -> Iterator[str]:
    """The Python image with a setuid-root copy of python at /opt/suid/python, run as nobody."""
    client = docker.from_env()
    tag = f"cq-test/python-setuid:{uuid.uuid4().hex[:8]}"
    dockerfile = (
        f"FROM {test_images.python}\n"
        "RUN mkdir -p /opt/suid && cp /usr/bin/python3 /opt/suid/python"
        " && chmod 4755 /opt/suid/python\n"
        "USER 65534:65534\n"
    ).encode()
    # No network for the RUN step: it needs none, and then not the engine's default bridge.
    client.images.build(
        fileobj=io.BytesIO(dockerfile), tag=tag, rm=True, forcerm=True, network_mode="none"
    )
    yield tag
    with contextlib.suppress(Exception):
        client.images.remove(tag, force=True)


async def test_no_privilege_gain(
    fetch: Fetch,
    worker_ids: list[str],
    start_worker: StartWorker,
    test_images: Any,
    setuid_image: str,
) -> None:
    """A job as an unprivileged user stays one (setuid binaries do nothing: no-new-privileges);
    a job as root has no more than Docker's default capabilities, less NET_RAW."""
    worker_ids.append(new_id("g"))
    await start_worker(worker_ids[0], network="none", container_user="image")
    job = {"image": setuid_image, "command": ["python3", "-c", PRIVILEGES]}
    result, logs = await run_job(fetch, job)
    assert result["reason"] == "Success", (result, logs)
    got = values(logs)
    assert got["nonewprivs"] == "1", logs
    assert int(got["capeff"], 16) == 0 and int(got["capprm"], 16) == 0, logs
    assert got["setuid_binary_euid"] == "65534", logs
    assert got["setuid"] == "refused", logs
    # The same container without the runner's settings: the setuid binary does make root, so
    # it is the runner that stopped it.
    client = docker.from_env()
    plain = client.containers.run(
        setuid_image, ["python3", "-c", PRIVILEGES], network_mode="none", remove=True
    ).decode()
    assert values(plain)["setuid_binary_euid"] == "0", plain

    status = "grep -E '^(CapEff|CapBnd):' /proc/self/status | tr -d '\\t' | tr : ="
    result, logs = await run_job(fetch, {"image": test_images.busybox, "command": status})
    assert result["reason"] == "Success", (result, logs)
    got = values(logs)
    allowed = sum(1 << bit for bit in ROOT_CAPABILITIES.values())
    for name in ("CapEff", "CapBnd"):
        caps = int(got[name], 16)
        assert caps & ~allowed == 0, (name, hex(caps), logs)
        assert not caps & (1 << CAP_NET_RAW), (name, logs)
    assert int(got["CapBnd"], 16) != 0, logs  # root in the container: the check saw something


async def test_networks(
    fetch: Fetch, worker_ids: list[str], start_worker: StartWorker, test_images: Any
) -> None:
    client = docker.from_env()
    base = new_id("n")
    # "<id>0" first: its network's name contains the other's (Docker's name filter matches parts
    # of names, so "is there a network called compute-queue-<id>?" must compare whole names).
    worker_ids[:] = [base + "0", base, new_id("i"), new_id("x")]
    await start_worker(worker_ids[0], queues=("q0",))
    await start_worker(worker_ids[1], queues=("q",))  # bridge, the default
    await start_worker(worker_ids[2], queues=("qi",), network="internal")
    await start_worker(worker_ids[3], queues=("qn",), network="none")
    script = "; ".join(
        [
            "echo nets=$(ls /sys/class/net | tr '\\n' ' ')",
            "echo addr=$(ip -4 -o addr show eth0 2>/dev/null | tr -s ' ' | cut -d ' ' -f 4)",
            "echo default=$(ip route | grep -c '^default')",
        ]
    )
    got = {}
    for queue in ("q0", "q", "qi", "qn"):
        job = {"image": test_images.busybox, "command": script, "env": {"Q": queue}}
        result, logs = await run_job(fetch, job, queue=queue)
        assert result["reason"] == "Success", (queue, result, logs)
        got[queue] = values(logs)

    assert got["qn"]["nets"].split() == ["lo"], got["qn"]

    bridge = client.networks.get(f"compute-queue-{base}")
    assert bridge.name == f"compute-queue-{base}"
    assert bridge.attrs["Driver"] == "bridge" and not bridge.attrs["Internal"]
    assert bridge.attrs["Options"].get("com.docker.network.bridge.enable_icc") == "false"
    subnet = ipaddress.ip_network(bridge.attrs["IPAM"]["Config"][0]["Subnet"])
    assert ipaddress.ip_interface(got["q"]["addr"]).ip in subnet, (got["q"], subnet)
    assert got["q"]["default"] == "1", got["q"]

    internal = client.networks.get(f"compute-queue-{worker_ids[2]}-internal")
    assert internal.attrs["Internal"] is True
    assert internal.attrs["Options"].get("com.docker.network.bridge.enable_icc") == "false"
    subnet = ipaddress.ip_network(internal.attrs["IPAM"]["Config"][0]["Subnet"])
    assert ipaddress.ip_interface(got["qi"]["addr"]).ip in subnet, (got["qi"], subnet)


async def test_output_symlinks_are_not_followed(
    fetch: Fetch, worker_ids: list[str], start_worker: StartWorker, test_images: Any, tmp_path: Path
) -> None:
    host_dir = tmp_path / "host-only"
    host_dir.mkdir()
    secret = host_dir / "secret.txt"
    secret.write_text("host secret\n")
    secret.chmod(0o640)
    worker_ids.append(new_id("s"))
    await start_worker(worker_ids[0], network="none")
    script = "; ".join(
        [
            "echo real > /outputs/real.txt",
            "ln -s /etc/passwd /outputs/passwd",
            f"ln -s {secret} /outputs/host-file",
            f"ln -s {host_dir} /outputs/host-dir",
            "mkdir /outputs/sub",
            "ln -s ../real.txt /outputs/sub/again.txt",
            "ln -s / /outputs/sub/root",
        ]
    )
    result, logs = await run_job(fetch, {"image": test_images.busybox, "command": script})
    assert result["reason"] == "Success", (result, logs)
    assert set(result["outputs"]) == {"real.txt"}, result["outputs"]
    # Removing the run folder went nowhere near what the links pointed at.
    assert secret.read_text() == "host secret\n"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o640


def test_removing_a_run_folder_never_chmods_through_a_link(tmp_path: Path) -> None:
    """The retry of a failed removal makes folders writable: never a link's target."""
    target = tmp_path / "host-file"
    target.write_text("x")
    target.chmod(0o640)
    folder = tmp_path / "run" / "outputs"
    folder.mkdir(parents=True)
    link = folder / "link"
    link.symlink_to(target)
    _force_remove(os.unlink, str(link), None)
    assert not link.is_symlink()
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


async def test_a_dangling_link_in_the_job_cache(
    fetch: Fetch, worker_ids: list[str], start_worker: StartWorker, test_images: Any
) -> None:
    """A job's link in /job-cache (to a path the host lacks) does not break the queue."""
    worker_ids.append(new_id("c"))
    await start_worker(worker_ids[0], network="none")
    image = test_images.busybox
    link = f"ln -s /nowhere-{uuid.uuid4().hex} /job-cache/dangling"
    result, logs = await run_job(fetch, {"image": image, "command": link})
    assert result["reason"] == "Success", (result, logs)
    result, logs = await run_job(fetch, {"image": image, "command": "ls -l /job-cache"})
    assert result["reason"] == "Success", (result, logs)
    assert "dangling" in logs


async def test_leftover_containers_of_this_worker_only(
    fetch: Fetch, worker_ids: list[str], start_worker: StartWorker, test_images: Any
) -> None:
    # fetch: the host serves HTTP only once a test asks for its client.
    client = docker.from_env()
    me, other = new_id("l"), new_id("o")
    worker_ids[:] = [me, other]  # the other's container is removed at the end too
    ghost = client.containers.create(
        test_images.busybox, "true", labels={LABEL_WORKER: me, LABEL_RUN: "ghost"}
    )
    kept = client.containers.create(
        test_images.busybox, "true", labels={LABEL_WORKER: other, LABEL_RUN: "ghost"}
    )
    await start_worker(me, network="none")  # returns once registered
    with pytest.raises(docker.errors.NotFound):
        client.containers.get(ghost.id)
    assert client.containers.get(kept.id).labels[LABEL_WORKER] == other
