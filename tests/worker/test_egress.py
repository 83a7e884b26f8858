"""What a job on the worker's network cannot reach (SPEC §6, docs/worker.md "Isolation").

Real traffic from real containers: the test listens on this machine (on every address), and
builds a small "LAN" next to it, a network namespace behind a veth pair holding a private
(10.213.x.2), a shared (100.64.213.x) and a link-local (169.254.213.x) address with a listener.
A link-local address of its own stands in for the cloud metadata service: routing
169.254.169.254 into the namespace would take the real one away from a cloud machine while the
test runs. Jobs try to connect; the listeners count who arrived. Then the test takes the
worker's rules away and the same job gets through, so the rules, not the setup, refused it.

Installing rules needs root and the engine's iptables chains: elsewhere those tests skip
(under CI=true they fail). The warning when rules cannot be installed is tested everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import pytest

from jupyter_compute_queue.worker.agent import Agent
from jupyter_compute_queue.worker.docker_runner import DockerRunner
from jupyter_compute_queue.worker.egress import (
    BLOCKED_RANGES,
    Allowed,
    Egress,
    EgressUnavailable,
    blocked,
    connected_subnets,
    needed_by_jobs,
    parse_allowed,
)
from tests.docker_env import missing

from .conftest import JUPYTER, Fetch, StartWorker, remove_containers, run_job

CONNECT_TIMEOUT = 5  # seconds a job's nc waits; a REJECT answers at once
#: In a job's shell: the gateway of its network, an address of this machine on the bridge.
GATEWAY = "$(ip route | awk '/^default/ {print $3}')"


def new_id(kind: str) -> str:
    return f"egr{kind}{uuid.uuid4().hex[:6]}"


def values(logs: str) -> dict[str, str]:
    """``name=value`` lines of a job's log."""
    return dict(re.findall(r"^(\w+)=(.*)$", logs, re.MULTILINE))


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30)


def require_rules() -> None:
    """Skip (fail under CI) unless this process can install egress rules here."""
    try:
        Egress(new_id("probe")).installed()
    except EgressUnavailable as exc:
        missing(f"egress rules cannot be installed here: {exc}", "run the tests as root")


@dataclass
class Listener:
    """A TCP listener on every address of this machine, counting the peers it accepted."""

    sock: socket.socket
    peers: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        port: int = self.sock.getsockname()[1]
        return port

    def serve(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return  # closed at the end of the test
            self.peers.append(peer[0])
            with conn:
                conn.sendall(b"hello\n")


@pytest.fixture
def host_listener() -> Iterator[Listener]:
    sock = socket.socket()
    sock.bind(("0.0.0.0", 0))
    sock.listen(16)
    listener = Listener(sock)
    thread = threading.Thread(target=listener.serve, daemon=True)
    thread.start()
    yield listener
    # shutdown() wakes the accept() of the thread; close() alone may not.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    thread.join(5)


def host_address(client: Any) -> str:
    """An address of this machine other than loopback and the workers' bridges: the one its
    default route leaves from, else the gateway of the engine's default bridge."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("203.0.113.1", 9))  # no packet is sent
            address: str = probe.getsockname()[0]
            return address
        except OSError:
            pass
    gateway: str = client.networks.get("bridge").attrs["IPAM"]["Config"][0]["Gateway"]
    return gateway


@dataclass
class Lan:
    """The namespace's addresses, its listener's port and the peers it accepted."""

    private: str
    shared: str
    link_local: str
    port: int
    peers: list[str]


LAN_LISTENER = """
import socket, sys
sock = socket.socket()
sock.bind(("0.0.0.0", 0))
sock.listen(16)
print("port", sock.getsockname()[1], flush=True)
while True:
    conn, peer = sock.accept()
    print("peer", peer[0], flush=True)
    conn.sendall(b"hello\\n")
    conn.close()
"""


@pytest.fixture
def lan() -> Iterator[Lan]:
    """A namespace routed from this machine, with a listener on three non-public addresses."""
    require_rules()
    if shutil.which("ip") is None:
        missing("the ip command is not installed", "apt-get install -y iproute2")
    tag = uuid.uuid4().hex[:8]
    n = random.randrange(1, 250)
    ns, outer, inner = f"cq-lan-{tag}", f"cqh{tag}", f"cqn{tag}"
    lan = Lan(f"10.213.{n}.2", f"100.64.213.{n}", f"169.254.213.{n}", 0, [])
    steps = [
        ["ip", "netns", "add", ns],
        ["ip", "link", "add", outer, "type", "veth", "peer", "name", inner],
        ["ip", "link", "set", inner, "netns", ns],
        ["ip", "addr", "add", f"10.213.{n}.1/30", "dev", outer],
        ["ip", "link", "set", outer, "up"],
        *(
            ["ip", "netns", "exec", ns, "ip", "addr", "add", address, "dev", inner]
            for address in (f"{lan.private}/30", f"{lan.shared}/32", f"{lan.link_local}/32")
        ),
        ["ip", "netns", "exec", ns, "ip", "link", "set", inner, "up"],
        ["ip", "netns", "exec", ns, "ip", "route", "add", "default", "via", f"10.213.{n}.1"],
        ["ip", "route", "add", f"{lan.shared}/32", "dev", outer],
        ["ip", "route", "add", f"{lan.link_local}/32", "dev", outer],
    ]
    process = None
    try:
        for step in steps:
            run(*step)
        process = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", LAN_LISTENER],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        first = process.stdout.readline().split()
        assert first[:1] == ["port"], first
        lan.port = int(first[1])
        stdout = process.stdout

        def read() -> None:
            for line in stdout:
                lan.peers.append(line.split()[1])

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        yield lan
    finally:
        if process is not None:
            process.kill()
            process.wait(10)
        for undo in (
            ["ip", "route", "del", f"{lan.shared}/32"],
            ["ip", "route", "del", f"{lan.link_local}/32"],
            ["ip", "link", "del", outer],
            ["ip", "netns", "del", ns],
        ):
            subprocess.run(undo, capture_output=True, timeout=30, check=False)


@pytest.fixture
def worker_ids(docker_engine: Any) -> Iterator[list[str]]:
    """Worker ids whose containers, networks and rules are removed at the end (ask for this
    fixture before ``start_worker``, so that it ends after the workers)."""
    ids: list[str] = []
    yield ids
    client = docker.from_env()
    for worker in ids:
        remove_containers(client, worker)


def probe_script(targets: dict[str, str], dns: bool = False) -> str:
    """A job that tries each ``name: "address port"`` and prints ``name=open|closed``, and
    with ``dns`` whether it can resolve a name."""
    lines = [
        f"if echo | nc -w {CONNECT_TIMEOUT} {target} >/dev/null 2>&1;"
        f" then echo {name}=open; else echo {name}=closed; fi"
        for name, target in targets.items()
    ]
    if dns:
        lines.append("nslookup pypi.org >/dev/null 2>&1 && echo dns=ok || echo dns=failed")
    return "\n".join(lines)


def host_resolves() -> str:
    try:
        socket.getaddrinfo("pypi.org", 443)
        return "ok"
    except OSError:
        return "failed"


def runner_of(agent: Agent) -> DockerRunner:
    runner = agent.runner
    assert isinstance(runner, DockerRunner)
    return runner


async def test_bridge_jobs_cannot_reach_this_machine_or_private_ranges(
    fetch: Fetch,
    worker_ids: list[str],
    start_worker: StartWorker,
    test_images: Any,
    host_listener: Listener,
    lan: Lan,
) -> None:
    client = docker.from_env()
    worker_ids.append(new_id("b"))
    # The namespace's private address, on its port only, is allowed: an operator's mirror.
    mirror = parse_allowed(f"{lan.private}:{lan.port}")
    agent = await start_worker(worker_ids[0], allow_egress=(mirror,))
    address = host_address(client)
    targets = {
        "gateway": f"{GATEWAY} {host_listener.port}",
        "host": f"{address} {host_listener.port}",
        "mirror": f"{lan.private} {lan.port}",
        "shared": f"{lan.shared} {lan.port}",
        "linklocal": f"{lan.link_local} {lan.port}",
    }
    job = {"image": test_images.busybox, "command": probe_script(targets, dns=True)}
    result, logs = await run_job(fetch, job)
    assert result["reason"] == "Success", (result, logs)
    got = values(logs)
    assert {name: got[name] for name in targets} == {
        "gateway": "closed",
        "host": "closed",
        "mirror": "open",
        "shared": "closed",
        "linklocal": "closed",
    }, logs
    # DNS goes through the engine's resolver, whose queries leave from the container (to a
    # private resolver on many machines, this one included): it must keep working.
    assert got["dns"] == host_resolves(), logs
    assert host_listener.peers == [], host_listener.peers
    assert len(lan.peers) == 1, lan.peers  # the mirror's one connection

    runner = runner_of(agent)
    network = client.networks.get(f"compute-queue-{worker_ids[0]}")
    installed = runner.egress.installed()
    for parent in ("DOCKER-USER", "INPUT"):
        (rule,) = installed[parent]
        assert f"-i br-{network.id[:12]}" in rule and runner.egress.tag in rule, installed

    # Without the rules the same job reaches everything: the rules refused it, not the setup.
    # (Another env, or the host would answer with the first run's cached result.)
    await asyncio.to_thread(runner.egress.remove)
    result, logs = await run_job(fetch, {**job, "env": {"AGAIN": "1"}})
    assert result["reason"] == "Success", (result, logs)
    assert {name: values(logs)[name] for name in targets} == dict.fromkeys(targets, "open"), logs
    assert len(host_listener.peers) == 2, host_listener.peers


async def test_internal_jobs_cannot_reach_this_machine(
    fetch: Fetch,
    worker_ids: list[str],
    start_worker: StartWorker,
    test_images: Any,
    host_listener: Listener,
) -> None:
    """An ``internal`` network has no route off the machine, but the machine itself answers
    on every address; the INPUT rules close that."""
    require_rules()
    client = docker.from_env()
    worker_ids.append(new_id("i"))
    agent = await start_worker(worker_ids[0], queues=("qi",), network="internal")
    targets = {
        "gateway": f"{GATEWAY} {host_listener.port}",
        "host": f"{host_address(client)} {host_listener.port}",
    }
    job = {"image": test_images.busybox, "command": probe_script(targets)}
    result, logs = await run_job(fetch, job, queue="qi")
    assert result["reason"] == "Success", (result, logs)
    assert {name: values(logs)[name] for name in targets} == dict.fromkeys(targets, "closed")
    assert host_listener.peers == [], host_listener.peers

    await asyncio.to_thread(runner_of(agent).egress.remove)
    result, logs = await run_job(fetch, {**job, "env": {"AGAIN": "1"}}, queue="qi")
    # What the engine alone allows an internal network.
    assert {name: values(logs)[name] for name in targets} == dict.fromkeys(targets, "open"), logs
    assert len(host_listener.peers) == 2, host_listener.peers


async def test_a_restarted_worker_replaces_its_leftover_rules(
    fetch: Fetch, worker_ids: list[str], start_worker: StartWorker, test_images: Any
) -> None:
    require_rules()
    client = docker.from_env()
    me, other = new_id("r"), new_id("o")
    worker_ids[:] = [me, other]
    # What a killed earlier process of this worker left (its network gone), and another
    # worker's rules, which this worker must not touch.
    Egress(me).install("cqgone0")
    Egress(other).install("cqother0")
    agent = await start_worker(me, network="bridge")
    result, logs = await run_job(fetch, {"image": test_images.busybox, "command": "true"})
    assert result["reason"] == "Success", (result, logs)
    bridge = f"br-{client.networks.get(f'compute-queue-{me}').id[:12]}"
    for parent, rules in Egress(me).installed().items():
        assert len(rules) == 1 and f"-i {bridge}" in rules[0], (parent, rules)
    for parent, rules in Egress(other).installed().items():
        assert len(rules) == 1 and "-i cqother0" in rules[0], (parent, rules)

    # The worker removes its rules with its network when it stops.
    await agent.shutdown(grace=0)
    assert Egress(me).installed() == {"DOCKER-USER": [], "INPUT": []}
    assert [n.name for n in client.networks.list(names=[f"compute-queue-{me}"])] == []
    assert len(Egress(other).installed()["INPUT"]) == 1


def other_backend() -> str:
    """The iptables program (nft or legacy) whose tables lack the engine's chain."""
    for program in ("iptables-legacy", "iptables-nft"):
        try:
            Egress(new_id("p"), iptables=program).installed()
        except EgressUnavailable:
            return program
    raise AssertionError("both iptables backends hold DOCKER-USER: cannot test a missing one")


def test_what_stops_the_rules_is_said() -> None:
    require_rules()
    with pytest.raises(EgressUnavailable, match="no iptables program was found"):
        Egress(new_id("m"), iptables="/nonexistent/iptables").install("cqnone0")
    with pytest.raises(EgressUnavailable, match=r"DOCKER-USER chain was not found.*--iptables"):
        Egress(new_id("m"), iptables=other_backend()).install("cqnone0")


def test_a_failed_install_leaves_no_rules() -> None:
    """All or nothing: the last step (the jump) fails, on a name no interface can have."""
    require_rules()
    egress = Egress(new_id("f"))
    with pytest.raises(EgressUnavailable, match="interface name"):
        egress.install("x" * 20)
    assert egress.installed() == {"DOCKER-USER": [], "INPUT": []}
    listing = subprocess.run(
        ["iptables", "-w", "10", "-S"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    assert egress.forward_chain not in listing and egress.input_chain not in listing


def test_not_root_is_said() -> None:
    """Checked in a real unprivileged process (as root: dropped to nobody with setpriv)."""
    code = (
        "from jupyter_compute_queue.worker.egress import Egress, EgressUnavailable\n"
        "try:\n    Egress('w').install('cqnone0')\nexcept EgressUnavailable as e:\n    print(e)\n"
    )
    argv = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    assert "does not run as root" in done.stdout, (done.stdout, done.stderr)


async def test_the_worker_warns_when_it_cannot_restrict_egress(
    fetch: Fetch,
    worker_ids: list[str],
    start_worker: StartWorker,
    test_images: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker_ids.append(new_id("w"))
    caplog.set_level(logging.WARNING, "jupyter_compute_queue.worker.docker_runner")
    await start_worker(worker_ids[0], iptables="/nonexistent/iptables")
    result, logs = await run_job(fetch, {"image": test_images.busybox, "command": "true"})
    assert result["reason"] == "Success", (result, logs)  # jobs still run
    (warning,) = [r.getMessage() for r in caplog.records if "can reach" in r.getMessage()]
    why = "no iptables program was found" if os.geteuid() == 0 else "does not run as root"
    for part in (
        f"compute-queue-{worker_ids[0]}",
        "this machine's own services",
        "169.254.169.254",
        why,
        "as root",
        "DOCKER-USER",
        "--network internal",
        "--network none",
    ):
        assert part in warning, (part, warning)


def test_the_worker_refuses_a_bad_allow_egress(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            *(JUPYTER, "compute-queue", "worker", "q", "--url", "http://127.0.0.1:9/"),
            *("--data-dir", str(tmp_path), "--allow-egress", "10.0.0.5:http"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "--allow-egress '10.0.0.5:http'" in done.stderr, done.stderr


# --- what the rules are made of (no root needed) --------------------------------------------


def test_allowed_destinations() -> None:
    assert parse_allowed("10.0.0.5") == Allowed(ipaddress.IPv4Network("10.0.0.5/32"))
    assert parse_allowed(" 10.1.2.3/16:3128 ") == Allowed(
        ipaddress.IPv4Network("10.1.0.0/16"), 3128
    )
    assert str(parse_allowed("10.0.0.5:53")) == "10.0.0.5/32:53"
    assert parse_allowed("10.0.0.5:53").matches() == [
        ["-d", "10.0.0.5/32", "-p", "tcp", "--dport", "53"],
        ["-d", "10.0.0.5/32", "-p", "udp", "--dport", "53"],
    ]
    for bad in (
        "",
        "host.example",
        "10.0.0.5:",
        "10.0.0.5:0",
        "10.0.0.5:70000",
        "::1",
        "1.2.3.4/33",
    ):
        with pytest.raises(ValueError, match="--allow-egress"):
            parse_allowed(bad)


def test_refused_ranges_cover_metadata_and_the_lan(tmp_path: Path) -> None:
    metadata = ipaddress.IPv4Address("169.254.169.254")
    assert any(metadata in r for r in BLOCKED_RANGES)
    for private in ("10.1.2.3", "172.16.0.1", "172.31.255.1", "192.168.1.1", "100.100.100.200"):
        assert any(ipaddress.IPv4Address(private) in r for r in BLOCKED_RANGES), private
    assert not any(ipaddress.IPv4Address("203.0.113.80") in r for r in BLOCKED_RANGES)
    # /proc/net/route as the kernel prints it (x86: little-endian): a default route, a bridge
    # in a private range, a public LAN.
    table = tmp_path / "route"
    table.write_text(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
        "br-1\t000012AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n"
        "eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
    )
    if sys.byteorder == "little":
        subnets = connected_subnets(str(table))
        assert subnets == [
            ipaddress.IPv4Network("172.18.0.0/16"),
            ipaddress.IPv4Network("192.0.2.0/24"),
        ]
        assert blocked(subnets) == [*BLOCKED_RANGES, ipaddress.IPv4Network("192.0.2.0/24")]


def test_jobs_keep_their_resolvers_and_a_private_host() -> None:
    needed = needed_by_jobs("http://10.20.30.40:8888/base/compute-queue/")
    assert Allowed(ipaddress.IPv4Network("10.20.30.40/32"), 8888) in needed
    assert all(a.port == 53 for a in needed if a.network != ipaddress.IPv4Network("10.20.30.40"))
    # A loopback host is the container's own loopback: nothing to allow.
    assert all(
        not a.network.is_loopback for a in needed_by_jobs("http://127.0.0.1:8888/compute-queue/")
    )
    https = needed_by_jobs("https://10.9.8.7/compute-queue/")
    assert Allowed(ipaddress.IPv4Network("10.9.8.7/32"), 443) in https
