"""The worker's own fetches of job-given URLs follow its jobs' network policy (docs/worker.md,
Isolation): no loopback, private, shared, link-local or connected address, on any hop, unless
it is the host's API or the operator opened it with ``--allow-egress``.

First the policy alone (no network but loopback), then ``Transfers`` against servers on
127.0.0.1, then end to end: a real host, a real worker and Docker, and HTTP listeners on
127.0.0.1 that count every connection they get (a refused fetch must never reach them).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import http.server
import ipaddress
import json
import os
import posixpath
import socket
import subprocess
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from jupyter_compute_queue.client.client import Client
from jupyter_compute_queue.model.jobs import parse_definition
from jupyter_compute_queue.worker import images
from jupyter_compute_queue.worker.egress import connected_subnets, parse_allowed
from jupyter_compute_queue.worker.fetch_policy import (
    FetchPolicy,
    FetchRefused,
    Machine,
    from_blob_store,
)
from jupyter_compute_queue.worker.transfer import ContentCache, Transfers

from ..docker_env import free_loopback_port
from ..s3_env import S3_STORE
from .conftest import Fetch, StartWorker, run_job, unique_id

SECRET = "aws-secret-from-the-metadata-service"


class Listener:
    """An HTTP server on 127.0.0.1 that records each request's path and answers with
    ``SECRET`` (or with a redirect to ``redirect_to``)."""

    def __init__(self, redirect_to: str | None = None, body: bytes | None = None) -> None:
        self.paths: list[str] = []
        #: Every TCP connection accepted (a git:// client never sends an HTTP request line).
        self.connections = 0
        self.redirect_to = redirect_to
        self.body = body if body is not None else SECRET.encode()
        listener = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                listener.paths.append(self.path)
                if listener.redirect_to is not None:
                    self.send_response(302)
                    self.send_header("Location", listener.redirect_to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(listener.body)))
                self.end_headers()
                self.wfile.write(listener.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            def verify_request(self, request: Any, client_address: Any) -> bool:
                listener.connections += 1
                return True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def listen() -> Iterator[Callable[..., Listener]]:
    """``listen(redirect_to=None)`` → a recording :class:`Listener`, closed at the end."""
    made: list[Listener] = []

    def make(redirect_to: str | None = None, body: bytes | None = None) -> Listener:
        made.append(Listener(redirect_to, body))
        return made[-1]

    yield make
    for listener in made:
        listener.close()


def allow(*listeners: Listener) -> tuple[Any, ...]:
    """``--allow-egress 127.0.0.1:PORT`` for each listener."""
    return tuple(parse_allowed(f"127.0.0.1:{listener.port}") for listener in listeners)


# --- the policy ---------------------------------------------------------------------------

#: A policy that knows nothing of this machine's networks (those are tested on their own).
BARE = FetchPolicy(machine=Machine())


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "127.0.0.1 is a loopback address"),
        ("127.5.6.7", "127.5.6.7 is a loopback address"),
        ("10.1.2.3", "10.1.2.3 is a private address"),
        ("172.16.0.1", "172.16.0.1 is a private address"),
        ("172.31.255.254", "172.31.255.254 is a private address"),
        ("192.168.1.1", "192.168.1.1 is a private address"),
        ("100.64.0.1", "100.64.0.1 is a shared (carrier-grade NAT) address (100.64.0.0/10)"),
        ("100.100.100.200", "100.100.100.200 is a shared"),  # Alibaba Cloud's metadata
        ("169.254.169.254", "169.254.169.254 is a link-local address"),
        ("0.0.0.0", "0.0.0.0 is an unspecified address"),
        ("0.1.2.3", "0.1.2.3 is an unspecified address"),
        ("224.0.0.1", "224.0.0.1 is a multicast address"),
        ("239.255.255.250", "239.255.255.250 is a multicast address"),
        ("240.0.0.1", "240.0.0.1 is a reserved address"),
        ("255.255.255.255", "255.255.255.255 is a reserved address"),
        ("::1", "::1 is a loopback address"),
        ("::", ":: is an unspecified address"),
        ("fd00::1", "fd00::1 is a unique local (private) address"),
        ("fc00::1", "fc00::1 is a unique local (private) address"),
        ("fe80::1", "fe80::1 is a link-local address"),
        ("fe80::1%eth0", "fe80::1 is a link-local address"),
        ("fec0::1", "fec0::1 is a site-local address"),
        ("ff02::1", "ff02::1 is a multicast address"),
        ("::127.0.0.1", "::127.0.0.1 is a reserved address"),  # IPv4-compatible (deprecated)
        # IPv6 forms that carry a refused IPv4 address: mapped, NAT64, 6to4.
        ("::ffff:169.254.169.254", "::ffff:169.254.169.254 (IPv4 169.254.169.254) is a link-local"),
        ("::ffff:127.0.0.1", "(IPv4 127.0.0.1) is a loopback address"),
        ("::ffff:10.0.0.1", "(IPv4 10.0.0.1) is a private address"),
        ("64:ff9b::a9fe:a9fe", "(IPv4 169.254.169.254) is a link-local address"),
        ("2002:a9fe:a9fe::1", "(IPv4 169.254.169.254) is a link-local address"),
    ],
)
def test_refused_addresses(address: str, why: str) -> None:
    refusal = BARE.refusal(address, 80)
    assert refusal is not None and f"{address.split('%')[0]} " in refusal, refusal
    assert why in refusal, refusal


def test_the_message_says_how_to_open_an_address() -> None:
    assert BARE.refusal("169.254.169.254", 80) == (
        "169.254.169.254 is a link-local address; a worker opens it with --allow-egress"
        " 169.254.169.254:80"
    )
    assert BARE.refusal("::ffff:10.0.0.5", 3128) == (
        "::ffff:10.0.0.5 (IPv4 10.0.0.5) is a private address; a worker opens it with"
        " --allow-egress 10.0.0.5:3128"
    )
    assert BARE.refusal("fd00::1", 80) == (
        "fd00::1 is a unique local (private) address; --allow-egress opens IPv4 destinations only"
    )


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "1.1.1.1", "203.0.113.9", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"],
)
def test_public_addresses_are_allowed(address: str) -> None:
    assert BARE.refusal(address, 443) is None


def test_the_machines_own_networks_are_refused() -> None:
    machine = Machine(
        connected=(ipaddress.ip_network("203.0.113.0/24"), ipaddress.ip_network("2001:db8:1::/64")),
        addresses=frozenset({ipaddress.ip_address("198.51.100.7")}),
    )
    policy = FetchPolicy(machine=machine)
    assert str(policy.refusal("203.0.113.9", 80)).startswith(
        "203.0.113.9 is on a network this machine is directly connected to (203.0.113.0/24)"
    )
    assert "directly connected to (2001:db8:1::/64)" in str(policy.refusal("2001:db8:1::5", 80))
    assert "(IPv4 203.0.113.9) is on a network" in str(policy.refusal("::ffff:203.0.113.9", 80))
    assert str(policy.refusal("198.51.100.7", 80)).startswith(
        "198.51.100.7 is an address of this machine"
    )
    assert policy.refusal("198.51.100.8", 80) is None
    assert policy.refusal("2001:db8:2::5", 80) is None


def test_the_machines_networks_are_read_from_the_kernel(tmp_path: Path) -> None:
    """Connected subnets (IPv4 and IPv6 routes without a gateway) and own addresses (the
    FIB's local leaves, IPv6 local routes), from files as this machine's kernel wrote them."""
    (tmp_path / "route").write_text(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
        "eth0\t007100CB\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
    )
    (tmp_path / "fib_trie").write_text(
        "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 127.0.0.1\n        /32 host LOCAL\n"
        "     |-- 198.51.100.7\n        /32 host LOCAL\n"
        "     |-- 203.113.0.0\n        /24 link UNICAST\n"
    )
    zero = "0" * 32
    (tmp_path / "ipv6_route").write_text(
        f"fd000000000000000000000000000000 40 {zero} 00 {zero} 00000100 1 0 00000001 eth0\n"
        f"fe800000000000000000000000000000 40 {zero} 00 {zero} 00000100 1 0 00000001 eth0\n"
        f"{zero} 00 {zero} 00 fd000000000000000000000000000001 00000400 3 0 00000003 eth0\n"
        f"fd000000000000000000000000000002 80 {zero} 00 {zero} 0 4 0 80200001 eth0\n"
        f"ff000000000000000000000000000000 08 {zero} 00 {zero} 00000100 1 0 00000001 eth0\n"
        f"{zero[:-1]}1 80 {zero} 00 {zero} 0 4 0 80200001 lo\n"
    )
    machine = Machine.read(str(tmp_path))
    assert set(machine.connected) == {
        ipaddress.ip_network("203.0.113.0/24"),
        ipaddress.ip_network("fd00::/64"),
        ipaddress.ip_network("fe80::/64"),
    }
    assert machine.addresses == {
        ipaddress.ip_address(a) for a in ("127.0.0.1", "198.51.100.7", "fd00::2", "::1")
    }
    # And this machine's own tables: the IPv4 connected subnets are the egress module's.
    assert set(connected_subnets()) <= set(Machine.read().connected)


def test_the_host_api_and_allow_egress_are_allowed() -> None:
    policy = FetchPolicy(
        "http://127.0.0.1:8888/base/compute-queue/",
        (parse_allowed("10.0.0.5:3128"), parse_allowed("192.168.0.0/16")),
        Machine(),
    )
    assert policy.refusal("127.0.0.1", 8888) is None
    assert policy.refusal("::ffff:127.0.0.1", 8888) is None
    assert "127.0.0.1 is a loopback address" in str(policy.refusal("127.0.0.1", 8889))
    assert policy.refusal("10.0.0.5", 3128) is None
    assert policy.refusal("::ffff:10.0.0.5", 3128) is None
    assert "10.0.0.5 is a private address" in str(policy.refusal("10.0.0.5", 80))
    assert policy.refusal("192.168.7.7", 22) is None
    assert policy.refusal("169.254.169.254", 80) is not None
    # A host API given by name: the addresses the name has.
    by_name = FetchPolicy("http://localhost:8888/compute-queue/", machine=Machine())
    assert by_name.refusal("127.0.0.1", 8888) is None
    assert by_name.refusal("127.0.0.1", 80) is not None


def _resolver(*addresses: str, calls: list[str] | None = None) -> Any:
    """A stand-in for ``getaddrinfo`` that gives ``addresses`` for every name."""

    def resolve(host: str, port: int, *args: Any) -> list[Any]:
        if calls is not None:
            calls.append(host)
        found = []
        for address in addresses:
            if ":" in address:
                found.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0)))
            else:
                found.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)))
        return found

    return resolve


def test_a_name_that_resolves_to_a_refused_address_is_refused() -> None:
    policy = FetchPolicy(machine=Machine(), resolve=_resolver("169.254.169.254"))
    with pytest.raises(FetchRefused) as refused:
        policy.connect("metadata.example.org", 80, 5)
    assert str(refused.value) == (
        "metadata.example.org resolves to 169.254.169.254, which is a link-local address;"
        " a worker opens it with --allow-egress 169.254.169.254:80"
    )
    with pytest.raises(FetchRefused, match=r"localhost resolves to .* loopback"):
        FetchPolicy(machine=Machine()).connect("localhost", 80, 5)  # the real resolver


def test_the_name_is_resolved_once_and_a_checked_address_is_connected() -> None:
    """No second lookup between check and connect (DNS rebinding): the connection goes to
    the address that was checked, skipping the refused ones."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        calls: list[str] = []
        policy = FetchPolicy(
            allowed=(parse_allowed(f"127.0.0.1:{port}"),),
            machine=Machine(),
            resolve=_resolver("10.0.0.1", "fd00::1", "127.0.0.1", calls=calls),
        )
        with policy.connect("rebinding.example.org", port, 5) as sock:
            assert sock.getpeername() == ("127.0.0.1", port)
        assert calls == ["rebinding.example.org"]


# --- Transfers: hops and the host's redirects -------------------------------------------------


class _Host(http.server.BaseHTTPRequestHandler):
    """A host's API at ``/api/``: ``f/{key}`` and ``j/x/outputs/…`` answer 307 to the blob
    store, ``j/x/inputs/…`` to the URL a job gave. Dot segments are resolved first, as a
    proxy in front of a host may do."""

    protocol_version = "HTTP/1.1"
    store: str
    job_given: str

    def do_GET(self) -> None:
        path = posixpath.normpath(unquote(urlsplit(self.path).path))
        if path.startswith(("/api/f/", "/api/j/x/outputs/")):
            self._redirect(self.store)
        elif path.startswith("/api/j/x/inputs/"):
            self._redirect(self.job_given)
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def _redirect(self, location: str) -> None:
        self.send_response(307)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


async def test_transfers_check_every_hop_of_a_url_input_but_the_stores(
    tmp_path: Path, listen: Any
) -> None:
    store = listen(body=b"blob bytes")
    store_url = f"{store.url}/bucket/blob?X-Amz-Signature=s"
    inside = listen()
    handler = type("Host", (_Host,), {"store": store_url, "job_given": f"{inside.url}/creds"})
    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=host.serve_forever, args=(0.05,), daemon=True).start()
    api = f"http://127.0.0.1:{host.server_address[1]}/api/"
    transfers = Transfers(
        api, "tok", ContentCache(tmp_path / "cache"), backoff=0.01, policy=FetchPolicy(api)
    )
    try:
        # The host's blob routes redirect to its store (on loopback here, like MinIO): allowed.
        for route in ("f/" + "a" * 64, "j/x/outputs/result.txt"):
            await transfers.fetch(api + route, tmp_path / "got")
            assert (tmp_path / "got").read_bytes() == b"blob bytes"
        assert store.connections == 2
        # Its inputs route redirects to what a job gave: that hop is checked.
        for route in (
            "j/x/inputs/creds",
            "j/x/outputs/../inputs/creds",
            "j/x/outputs/%2E%2E/inputs/a",
        ):
            with pytest.raises(FetchRefused) as refused:
                await transfers.fetch(api + route, tmp_path / "no")
            assert refused.value.requested == api + route
            message = str(refused.value)
            assert f"redirected to {inside.url}/creds, which the worker does not fetch" in message
        assert inside.connections == 0
        # A job's URL straight to the store's address is job-given too: refused.
        with pytest.raises(FetchRefused, match=r"the worker does not fetch .*/bucket/blob: 127"):
            await transfers.fetch(store_url, tmp_path / "no")
        assert store.connections == 2
        # A key blob (pinned by its hash) at a URL the host gave is fetched wherever it is.
        key = hashlib.sha256(b"blob bytes").hexdigest()
        transfers.cache = ContentCache(tmp_path / "empty-cache")  # not cached yet
        assert await transfers.fetch(store_url, tmp_path / "key", sha256=key) == key
        assert store.connections == 3
    finally:
        host.shutdown()
        host.server_close()


def test_which_host_redirects_go_to_the_blob_store() -> None:
    api = urlsplit("http://h:8888/base/compute-queue/")
    yes = ["f/abc", "j/J/outputs/a/b.txt", "q/Q/j/J/outputs/x"]
    no = [
        "j/J/inputs/x",
        "q/Q/j/J/inputs/x",
        "f/abc/exists",
        "j/J/outputs/../inputs/x",
        "j/J/outputs/%2e%2e/inputs/x",
        "q/../j/J/outputs/x",
    ]
    for route in yes:
        assert from_blob_store(urlsplit(f"http://h:8888/base/compute-queue/{route}"), api), route
    for route in no:
        assert not from_blob_store(urlsplit(f"http://h:8888/base/compute-queue/{route}"), api)
    assert not from_blob_store(urlsplit("http://other:8888/base/compute-queue/f/abc"), api)
    assert not from_blob_store(urlsplit("http://h:8888/elsewhere/f/abc"), api)


# --- url inputs ---------------------------------------------------------------------------


async def test_a_url_input_to_loopback_is_refused_before_any_request(
    fetch: Fetch, start_worker: StartWorker, test_images: Any, listen: Any
) -> None:
    """A listener on 127.0.0.1 (not the host's API port) stands for the metadata service, the
    Docker API on :2375 or a LAN admin page: the worker must not fetch it for a job."""
    metadata = listen()
    url = f"{metadata.url}/latest/meta-data/iam/security-credentials/"
    await start_worker(unique_id("ssrf"), network="none")
    definition = {
        "image": test_images.busybox,
        "command": "cat /inputs/creds",
        "inputs": {"creds": {"type": "url", "value": url + "?token=hidden"}},
    }
    result, logs = await run_job(fetch, definition)
    assert SECRET not in logs, logs
    assert metadata.connections == 0, "the worker contacted a refused address"
    assert result["reason"] == "Error", (result, logs)
    message = result["message"]
    assert "inputs.creds" in message and url in message, message
    assert "hidden" not in message, message  # the query string is left out
    assert "127.0.0.1 is a loopback address; a worker opens it with --allow-egress" in message


async def test_a_redirect_to_a_refused_address_is_refused(
    fetch: Fetch, start_worker: StartWorker, test_images: Any, listen: Any
) -> None:
    """An allowed server (standing for any public one) answers 302 to an address that is not
    allowed: the worker refuses that hop, and the second listener never hears of it. With
    ``--allow-egress`` naming both, the same job reads the data: the refusal is the policy."""
    inside = listen()
    outside = listen(redirect_to=f"{inside.url}/latest/meta-data/")
    definition = {
        "image": test_images.busybox,
        "command": "cat /inputs/creds",
        "inputs": {"creds": {"type": "url", "value": f"{outside.url}/innocent.txt"}},
    }
    await start_worker(unique_id("redir"), network="none", allow_egress=allow(outside))
    result, logs = await run_job(fetch, definition)
    assert SECRET not in logs, logs
    assert outside.paths == ["/innocent.txt"]
    assert inside.connections == 0, "the worker followed the redirect to a refused address"
    assert result["reason"] == "Error", (result, logs)
    message = result["message"]
    assert "inputs.creds" in message and f"{inside.url}/latest/meta-data/" in message, message
    assert "127.0.0.1 is a loopback address" in message, message

    # The control: the operator opened both, and the same job on another queue reads the data.
    await start_worker(
        unique_id("redir-ok"), queues=("r",), network="none", allow_egress=allow(outside, inside)
    )
    result, logs = await run_job(fetch, definition, queue="r")
    assert result["reason"] == "Success", (result, logs)
    assert SECRET in logs.splitlines(), logs
    assert inside.paths == ["/latest/meta-data/"]


async def test_the_hosts_input_redirect_is_no_way_around(
    fetch: Fetch, start_worker: StartWorker, test_images: Any, listen: Any, host_api: str
) -> None:
    """The host's API is allowed, and its ``j/{job}/inputs/{path}`` route answers 307 to
    whatever URL that job gave: the hop after it is checked like any job-given URL."""
    metadata = listen()
    parked = {
        "image": test_images.busybox,
        "command": "true",
        "inputs": {"creds": {"type": "url", "value": f"{metadata.url}/secret"}},
    }
    # Submitted to a queue no worker serves: the host only keeps its definition.
    response = await fetch("q", "parked", method="POST", json=parked)
    assert response.code == 200, response.body
    parked_id = json.loads(response.body)["jobId"]
    via_host = f"{host_api}j/{parked_id}/inputs/creds"
    await start_worker(unique_id("via-host"), network="none")
    definition = {
        "image": test_images.busybox,
        "command": "cat /inputs/creds",
        "inputs": {"creds": {"type": "url", "value": via_host}},
    }
    result, logs = await run_job(fetch, definition)
    assert SECRET not in logs, logs
    assert metadata.connections == 0
    assert result["reason"] == "Error", (result, logs)
    assert f"{metadata.url}/secret" in result["message"], result


# --- build contexts -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["archive", "git over http", "git protocol"])
async def test_a_build_context_at_a_refused_address_is_refused(
    fetch: Fetch, start_worker: StartWorker, test_images: Any, listen: Any, kind: str
) -> None:
    repo = listen()
    scheme, path = {
        "archive": ("http", "/ctx.tar.gz"),
        "git over http": ("http", "/repo.git"),
        "git protocol": ("git", "/repo.git"),
    }[kind]
    context = f"{scheme}://127.0.0.1:{repo.port}{path}"
    await start_worker(unique_id("ctx"), network="none")
    build = {"context": context, "dockerfile": f"FROM {test_images.busybox}\n"}
    result, logs = await run_job(fetch, {"build": build, "command": "true"})
    assert repo.connections == 0, "the worker contacted a refused address"
    assert result["reason"] == "Error", (result, logs)
    message = result["message"]
    assert "build.context" in message and context in message, message
    assert "127.0.0.1 is a loopback address" in message, message


# The controls: the same kinds of context, opened with --allow-egress, build. git goes through
# the worker's proxy for every protocol it may use: "dumb" and smart HTTP (smart HTTP POSTs,
# as GitHub's does) and git:// (through core.gitProxy and the proxy's CONNECT).


def _git(*args: str, cwd: Path) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args],
        cwd=cwd,
        capture_output=True,
        check=True,
    )


class _SmartGit(http.server.BaseHTTPRequestHandler):
    """``git http-backend`` as a CGI program: git's smart HTTP protocol."""

    protocol_version = "HTTP/1.1"
    root: str

    def do_GET(self) -> None:
        self._cgi()

    def do_POST(self) -> None:
        self._cgi()

    def _cgi(self) -> None:
        split = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        env = {
            "PATH": os.environ["PATH"],
            "GIT_PROJECT_ROOT": self.root,
            "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": split.path,
            "QUERY_STRING": split.query,
            "REQUEST_METHOD": self.command,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
            "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
        }
        out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True)
        head, _, payload = out.stdout.partition(b"\r\n\r\n")
        status, headers = 200, []
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Counting(http.server.ThreadingHTTPServer):
    connections = 0

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.connections += 1
        return True


@pytest.fixture
def context_site(tmp_path: Path, test_images: Any) -> Iterator[Callable[[str], tuple[str, Any]]]:
    """``context_site(kind)`` → (context URL, something whose ``connections`` counts the
    worker's connections, or None for git daemon): a build context saying a fresh message."""
    work = tmp_path / "repo"
    work.mkdir()
    message = f"built from an allowed context {uuid.uuid4().hex}"
    (work / "Dockerfile").write_text(f"FROM {test_images.busybox}\nCOPY message.txt /m.txt\n")
    (work / "message.txt").write_text(message + "\n")
    _git("init", "--quiet", "--initial-branch=main", cwd=work)
    _git("add", "-A", cwd=work)
    _git("commit", "--quiet", "-m", "context", cwd=work)
    site = tmp_path / "site"
    site.mkdir()
    _git("clone", "--quiet", "--bare", str(work), str(site / "repo.git"), cwd=tmp_path)
    _git("update-server-info", cwd=site / "repo.git")
    with tarfile.open(site / "ctx.tar.gz", "w:gz") as archive:
        for name in ("Dockerfile", "message.txt"):
            archive.add(work / name, arcname=name)
    servers: list[http.server.ThreadingHTTPServer] = []
    daemons: list[subprocess.Popen[bytes]] = []

    def serve(kind: str) -> tuple[str, Any]:
        if kind == "git protocol":
            port = free_loopback_port()
            daemon = subprocess.Popen(
                [
                    "git",
                    "daemon",
                    "--reuseaddr",
                    "--export-all",
                    f"--base-path={site}",
                    "--listen=127.0.0.1",
                    f"--port={port}",
                    str(site),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            daemons.append(daemon)
            for _ in range(100):
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                    break
                time.sleep(0.05)
            return f"git://127.0.0.1:{port}/repo.git", None
        handler: Any
        if kind == "git smart http":
            handler = type("Git", (_SmartGit,), {"root": str(site)})
        else:
            handler = functools.partial(_QuietFiles, directory=str(site))
        server = _Counting(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        url = f"http://127.0.0.1:{server.server_address[1]}"
        return (f"{url}/ctx.tar.gz" if kind == "archive" else f"{url}/repo.git"), server

    serve.message = message  # type: ignore[attr-defined]
    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()
    for daemon in daemons:
        daemon.terminate()
        daemon.wait(10)


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.parametrize("kind", ["archive", "git dumb http", "git smart http", "git protocol"])
async def test_an_allowed_build_context_builds(
    fetch: Fetch,
    start_worker: StartWorker,
    test_images: Any,
    context_site: Any,
    docker_engine: Any,
    kind: str,
) -> None:
    context, server = context_site(kind)
    port = urlsplit(context).port
    await start_worker(
        unique_id("ctx-ok"), network="none", allow_egress=(parse_allowed(f"127.0.0.1:{port}"),)
    )
    build = {"context": context}
    tag = images.build_tag(parse_definition({"build": build}).build)  # type: ignore[arg-type]
    try:
        result, logs = await run_job(fetch, {"build": build, "command": "cat /m.txt"})
        assert result["reason"] == "Success", (result, logs)
        assert context_site.message in logs.splitlines(), logs
        if server is not None:
            assert server.connections > 0
    finally:
        with contextlib.suppress(Exception):
            docker_engine.images.remove(tag, force=True)


# --- the host's own blob store stays reachable ---------------------------------------------


class TestABlobStoreOnLoopback:
    """The host keeps blobs in S3 (moto on 127.0.0.1, as a MinIO on the LAN would be): a
    ``key`` input (presigned URL in the assignment) and a ``url`` input to the host's
    ``f/{key}`` (a 307 to the store) both reach it; the policy is about job-given URLs."""

    @pytest.fixture
    def cq_config(self) -> dict[str, Any]:
        return {"blob_store_class": S3_STORE}

    @pytest.fixture
    def extra_server_config(self, s3_bucket: dict[str, Any]) -> dict[str, Any]:
        return {"S3BlobStore": s3_bucket}

    async def test_key_and_blob_route_inputs_reach_the_store(
        self,
        fetch: Fetch,
        start_worker: StartWorker,
        test_images: Any,
        host_api: str,
        host_token: str,
    ) -> None:
        data = b"stored in S3 on loopback\n"
        key = hashlib.sha256(data).hexdigest()
        client = Client(host_api.removesuffix("compute-queue/"), host_token, queue="q")
        await asyncio.to_thread(client.upload, data)  # through the host's 307 to the store
        await start_worker(unique_id("s3"), network="none")
        definition = {
            "image": test_images.busybox,
            "command": "cat /inputs/k.txt /inputs/u.txt",
            "inputs": {
                "k.txt": {"type": "key", "value": key},
                "u.txt": {"type": "url", "value": f"{host_api}f/{key}"},
            },
        }
        result, logs = await run_job(fetch, definition)
        assert result["reason"] == "Success", (result, logs)
        assert logs.splitlines().count(data.decode().strip()) == 2, logs
