"""The websockets under load and their access rules, over a real server and real sockets.

One client here speaks the websocket protocol by hand over a raw TCP socket so that it can do
what no library client does: subscribe to a busy log and then never read a byte.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import hashlib
import json
import os
import socket
import struct
import termios
from dataclasses import dataclass, field
from typing import Any

import pytest
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from jupyter_compute_queue.host.access import worker_credential

from .conftest import Fetch, body
from .scripted import Peer, Worker, WsFetch, watch

JOB = {"image": "busybox", "command": "echo hi"}
PHASES = ["pulling", "preparing", "running", "uploading"]
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3


def job(n: int) -> dict[str, Any]:
    return {"image": "busybox", "command": ["echo", str(n)]}


@pytest.fixture
def port(http_server_client: Any, jp_http_port: int) -> int:
    """The port of the running server (asking for the client starts the server)."""
    return jp_http_port


# --- a websocket client by hand -------------------------------------------------------------


@dataclass
class RawUpgrade:
    """The answer to a hand-made upgrade request, and the socket it came on."""

    sock: socket.socket
    status: int
    headers: dict[str, str]
    body: bytes = b""

    async def send_text(self, text: str) -> None:
        """One masked text frame (a client must mask, RFC 6455 §5.3)."""
        payload = text.encode()
        n = len(payload)
        if n < 126:
            header = bytes([0x81, 0x80 | n])
        elif n < 1 << 16:
            header = bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
        else:
            header = bytes([0x81, 0x80 | 127]) + n.to_bytes(8, "big")
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        await asyncio.get_running_loop().sock_sendall(self.sock, header + mask + masked)

    def unread(self) -> int:
        """Bytes the kernel holds for this socket that nobody has read."""
        raw = fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, struct.pack("i", 0))
        return int(struct.unpack("i", raw)[0])

    def close(self) -> None:
        self.sock.close()


async def raw_upgrade(
    port: int, path: str, headers: dict[str, str], rcvbuf: int | None = None
) -> RawUpgrade:
    """Send a websocket upgrade request by hand; read the status line and headers only (and the
    body of a refusal), so whatever the host sends after a 101 stays unread in the socket."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connecting, so the window is small from the handshake on
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):  # a byte at a time: read nothing past the headers
        byte = await asyncio.wait_for(loop.sock_recv(sock, 1), 10)
        assert byte, f"the host closed the socket during the handshake: {head!r}"
        head += byte
    status_line, *header_lines = head.decode("latin-1").split("\r\n")[:-2]
    answer = dict(line.split(": ", 1) for line in header_lines)
    answer = {k.lower(): v for k, v in answer.items()}
    upgrade = RawUpgrade(sock, int(status_line.split()[1]), answer)
    if upgrade.status == 101:
        accept = hashlib.sha1((key + WS_GUID).encode()).digest()
        assert answer["sec-websocket-accept"] == base64.b64encode(accept).decode()
    else:
        length = int(answer.get("content-length", "0"))
        while len(upgrade.body) < length:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, length - len(upgrade.body)), 10)
            assert chunk, "the host closed the socket mid-body"
            upgrade.body += chunk
    return upgrade


def server_send_queue(server_port: int, client_port: int) -> int | None:
    """Bytes the host's side of a loopback connection has not yet had acknowledged
    (``tx_queue`` in /proc/net/tcp), or None where that file is not available."""
    try:
        with open("/proc/net/tcp") as f:
            rows = f.read().splitlines()[1:]
    except OSError:
        return None
    for row in rows:
        cols = row.split()
        local, remote = cols[1].split(":")[1], cols[2].split(":")[1]
        if int(local, 16) == server_port and int(remote, 16) == client_port:
            return int(cols[4].split(":")[0], 16)
    return None


# --- reading a log subscription -------------------------------------------------------------


@dataclass
class Received:
    """What a subscriber got of one run's log, checked as it arrived."""

    text: list[str] = field(default_factory=list)
    size: int = 0  # bytes of text (the stream offset the next record must start at)
    messages: int = 0
    first_at: float | None = None
    complete_at: float | None = None  # when ``size`` reached what the test waits for

    @property
    def joined(self) -> str:
        return "".join(self.text)


async def collect(client: Peer, run_id: str, expected_bytes: int, timeout: float) -> Received:
    """Read ``logs`` messages of a run until ``expected_bytes`` of text arrived, checking that
    every record starts where the previous one ended (no gap, no repeat) and that ``next`` is
    where the last record ended."""
    got = Received()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while got.size < expected_bytes:
        message = await client.expect("logs", timeout=deadline - loop.time(), runId=run_id)
        got.messages += 1
        for record in message["records"]:
            assert "cut" not in record, "nothing was cut: the log is under max_log_bytes"
            assert record["o"] == got.size, f"record at {record['o']}, expected {got.size}"
            got.text.append(record["d"])
            got.size += len(record["d"].encode())
            if got.first_at is None:
                got.first_at = loop.time()
        assert message["next"] == got.size
        assert not message["done"] or got.size >= expected_bytes, "done before the end"
    got.complete_at = loop.time()
    assert got.size == expected_bytes, f"{got.size} bytes, more than the {expected_bytes} sent"
    return got


async def start_run(fetch: Fetch, worker: Worker, definition: dict[str, Any]) -> tuple[str, int]:
    answer = body(await fetch("q", "q", method="POST", json=definition))
    assign = await worker.expect("assign", runId=answer["runId"])
    return assign["runId"], assign["fence"]


# --- load -----------------------------------------------------------------------------------

LINE_BYTES = 4096
LINES_PER_MESSAGE = 8


def stuck_log_bytes() -> int:
    """Enough log to fill the kernel's buffers towards a client that never reads (the
    host's send buffer can grow to tcp_wmem's maximum), so the host must hold the rest."""
    try:
        with open("/proc/sys/net/ipv4/tcp_wmem") as f:
            wmem_max = int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        wmem_max = 4 * 2**20
    return min(max(2 * wmem_max + 2 * 2**20, 6 * 2**20), 40 * 2**20)


@pytest.mark.parametrize("cq_config", [{"max_log_bytes": 2**30}])  # nothing is cut
async def test_a_client_that_never_reads_does_not_slow_another(
    fetch: Fetch, jp_ws_fetch: WsFetch, port: int, jp_base_url: str, jp_auth_header: dict[str, str]
) -> None:
    loop = asyncio.get_running_loop()
    worker, _ = await Worker.connect(jp_ws_fetch, "w1", cpus=8)
    run_id, fence = await start_run(fetch, worker, JOB)
    others = [await start_run(fetch, worker, job(n)) for n in range(5)]

    stuck = await raw_upgrade(
        port, f"{jp_base_url}compute-queue/q/q/ws", jp_auth_header, rcvbuf=4096
    )
    assert stuck.status == 101, stuck.body
    await stuck.send_text(json.dumps({"type": "subscribe", "runId": run_id, "since": 0}))
    client = await watch(jp_ws_fetch)
    await client.send({"type": "subscribe", "runId": run_id, "since": 0})

    count = stuck_log_bytes() // LINE_BYTES // LINES_PER_MESSAGE * LINES_PER_MESSAGE
    lines = [f"{i:05d} ".ljust(LINE_BYTES - 1, "x") + "\n" for i in range(count)]
    expected = "".join(lines)
    reader = asyncio.create_task(collect(client, run_id, len(expected), timeout=15))

    health: list[float] = []

    async def probe_health() -> None:
        while True:
            start = loop.time()
            assert (await fetch("healthz")).code == 200
            health.append(loop.time() - start)
            await asyncio.sleep(0.05)

    prober = asyncio.create_task(probe_health())
    try:
        started = loop.time()
        for n, i in enumerate(range(0, count, LINES_PER_MESSAGE)):
            await worker.logs(run_id, fence, *lines[i : i + LINES_PER_MESSAGE])
            if n % 4 == 0:  # state changes of the other runs, interleaved with the log
                other, other_fence = others[n // 4 % len(others)]
                phase = PHASES[n // 4 // len(others) % len(PHASES)]
                await worker.send(
                    {"type": "phase", "runId": other, "fence": other_fence, "phase": phase}
                )
        sent = loop.time()
        for other, other_fence in others:
            assert (await worker.result(other, other_fence))["type"] == "accepted"
        got = await reader
    finally:
        prober.cancel()
        reader.cancel()

    # The host now holds the rest of the log for the stuck client: healthz is still quick.
    stuck_health = []
    for _ in range(5):
        start = loop.time()
        assert (await fetch("healthz")).code == 200
        stuck_health.append(loop.time() - start)

    assert got.joined == expected, "the reading client lost or reordered bytes"
    assert got.first_at is not None and got.complete_at is not None
    unread = stuck.unread()
    client_port = stuck.sock.getsockname()[1]
    host_queue = server_send_queue(port, client_port)
    print(
        f"\n[stuck reader] {len(expected) / 2**20:.1f} MiB in {count // LINES_PER_MESSAGE} "
        f"messages sent in {sent - started:.3f}s; the reading client got its first byte "
        f"{got.first_at - started:.3f}s after the start and the last "
        f"{got.complete_at - sent:+.3f}s after the last send, in {got.messages} messages; "
        f"healthz during the stream: max {max(health) * 1000:.1f} ms over {len(health)} probes, "
        f"afterwards max {max(stuck_health) * 1000:.1f} ms; the stuck client holds {unread} "
        f"unread bytes, the host's send queue to it {host_queue} bytes"
    )
    # The stuck client really is stuck: it read nothing, and what the host managed to hand to
    # the kernel for it is less than the log alone, so the host holds the rest.
    assert unread < 2**20
    assert unread + (host_queue or 0) < len(expected)
    assert got.complete_at - sent < 10, "the reading client waited for the stuck one"
    assert max(health) < 2 and max(stuck_health) < 1, "healthz waited for the stuck client"

    # The reading client also sees the end; the stuck one is still connected, still stuck.
    assert (await worker.result(run_id, fence))["type"] == "accepted"
    done = await client.expect("logs", runId=run_id, done=True)
    assert done["records"] == [] and done["next"] == len(expected)
    stuck.close()


@pytest.mark.parametrize(
    ("per_message", "interval"), [(100, 0.1), (1, 0.001)], ids=["10x100", "1000x1"]
)
async def test_a_thousand_log_frames_a_second_reach_a_subscriber_in_order(
    fetch: Fetch, jp_ws_fetch: WsFetch, per_message: int, interval: float
) -> None:
    loop = asyncio.get_running_loop()
    worker, _ = await Worker.connect(jp_ws_fetch, "w1")
    run_id, fence = await start_run(fetch, worker, JOB)
    client = await watch(jp_ws_fetch)
    lines = [f"frame {i:04d} {'.' * (i % 7)}\n" for i in range(1000)]
    total = len("".join(lines).encode())
    reader = asyncio.create_task(collect(client, run_id, total, timeout=15))

    start = loop.time()
    for n, i in enumerate(range(0, len(lines), per_message)):
        if i == 200:  # subscribe mid-stream: the replay and the live tail must join seamlessly
            await client.send({"type": "subscribe", "runId": run_id, "since": 0})
        delay = start + n * interval - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await worker.logs(run_id, fence, *lines[i : i + per_message])
    last_sent = loop.time()
    got = await reader

    assert got.joined.splitlines(keepends=True) == lines
    assert got.complete_at is not None
    print(
        f"\n[1000 frames/s, {per_message} per message] sent in {last_sent - start:.3f}s; "
        f"last line received {(got.complete_at - last_sent) * 1000:.1f} ms after the last send, "
        f"{got.messages} logs messages"
    )
    assert got.complete_at - last_sent < 2

    assert (await worker.result(run_id, fence))["type"] == "accepted"
    done = await client.expect("logs", runId=run_id, done=True)
    assert done["records"] == [] and done["next"] == total


# --- access ---------------------------------------------------------------------------------


def ws_url(port: int, base_url: str, *parts: str) -> str:
    return f"ws://127.0.0.1:{port}{base_url}compute-queue/{'/'.join(parts)}"


async def refused(url: str, headers: dict[str, str] | None = None) -> int:
    """The status a websocket connection is refused with (fails if it is accepted)."""
    try:
        conn = await websocket_connect(HTTPRequest(url, headers=headers or {}))
    except HTTPClientError as exc:
        return exc.code
    conn.close()
    raise AssertionError(f"{url} accepted the connection")


async def test_the_worker_socket_refuses_a_caller_without_credentials_before_the_upgrade(
    port: int, jp_base_url: str, jp_auth_header: dict[str, str]
) -> None:
    path = f"{jp_base_url}compute-queue/worker"
    for headers in ({}, {"Authorization": "token q:" + "0" * 64}, {"Authorization": "token x"}):
        answer = await raw_upgrade(port, path, headers)
        answer.close()
        assert answer.status == 401, (headers, answer.status)
        assert answer.headers["content-type"].startswith("application/json")
        assert "upgrade" not in answer.headers  # refused before the upgrade, not after it
        assert set(json.loads(answer.body)) == {"error"}
    accepted = await raw_upgrade(port, path, jp_auth_header)
    accepted.close()
    assert accepted.status == 101
    assert await refused(ws_url(port, jp_base_url, "worker")) == 401


async def test_a_worker_credential_registers_for_its_own_queue_only(
    fetch: Fetch,
    jp_ws_fetch: WsFetch,
    jp_serverapp: Any,
    port: int,
    jp_base_url: str,
) -> None:
    secret = jp_serverapp.web_app.settings["compute_queue"].secret
    auth = {"Authorization": f"token {worker_credential(secret, 'q')}"}
    worker, registered = await Worker.connect(jp_ws_fetch, "wq", headers=auth)
    assert registered["kept"] == []
    run_id, fence = await start_run(fetch, worker, JOB)  # it is really served work from q
    assert (await worker.result(run_id, fence))["type"] == "accepted"

    for queues in (["other"], ["q", "other"]):
        peer = Peer(await jp_ws_fetch("compute-queue", "worker", headers=auth))
        register = {"type": "register", "protocol": 1, "id": "wx", "capacity": {"cpus": 1}}
        await peer.send({**register, "queues": queues})
        error = await peer.expect("error")
        assert error["ref"] == "register" and "'other'" in error["error"], error
        await peer.send({"type": "heartbeat"})  # the socket stays, but it is not registered
        assert "register first" in (await peer.expect("error"))["error"]
        assert not [m for m in peer.seen if m["type"] == "registered"]
        peer.close()

    # Nothing of the refused registrations got a worker: a job in `other` stays queued.
    answer = body(await fetch("q", "other", method="POST", json=job(1)))
    status = body(await fetch("q", "other", "status"))
    assert answer["state"] == "Queued" and status["workers"] == []
    # A worker credential does not open the client socket of its queue either.
    assert await refused(ws_url(port, jp_base_url, "q", "q", "ws"), auth) == 403


@pytest.mark.parametrize("cq_config", [{}, {"public": True}], ids=["private", "public"])
async def test_an_anonymous_client_may_watch_a_public_queue_only(
    cq_config: dict[str, Any], port: int, jp_base_url: str
) -> None:
    url = ws_url(port, jp_base_url, "q", "pub", "ws")
    if cq_config.get("public"):
        client = Peer(await websocket_connect(HTTPRequest(url)))
        snapshot = await client.expect("snapshot")
        assert snapshot["queue"] == "pub" and snapshot["runs"] == []
        await client.send({"type": "ping"})
        await client.expect("pong")
        client.close()
    else:
        assert await refused(url) == 401
    assert await refused(ws_url(port, jp_base_url, "q", "local", "ws")) == 401
    assert await refused(ws_url(port, jp_base_url, "worker")) == 401
