"""``jupyter compute-queue`` as a user runs it: real subprocesses."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from jupyter_compute_queue.host.access import worker_identity
from jupyter_compute_queue.host.datadir import host_secret

JUPYTER = str(Path(sys.executable).with_name("jupyter"))


def cli(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [JUPYTER, "compute-queue", *args], capture_output=True, text=True, timeout=120, **kw
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request(url: str, token: str | None = None, data: Any = None) -> tuple[int, Any]:
    headers = {"Authorization": f"token {token}"} if token else {}
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, headers=headers, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        payload = exc.read()
        try:
            return exc.code, json.loads(payload or b"null")
        except ValueError:
            return exc.code, payload.decode(errors="replace")


def test_queue_new_names_are_unguessable() -> None:
    # The name is alone on the first line; the queue's URL follows when a host is found.
    names = {cli("queue", "new").stdout.splitlines()[0] for _ in range(2)}
    assert len(names) == 2 and all(re.fullmatch(r"[0-9a-f]{32}", n) for n in names)


def test_queue_token_admits_a_worker_to_that_queue(tmp_path: Path) -> None:
    out = cli("queue", "token", "gpu-box", "--data-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    credential = out.stdout.strip()
    identity = worker_identity(host_secret(tmp_path), credential)
    assert identity is not None and identity.queues == {"gpu-box"}
    bad = cli("queue", "token", "no/slashes", "--data-dir", str(tmp_path))
    assert bad.returncode == 2 and "queue name" in bad.stderr


def test_unknown_arguments_are_refused() -> None:
    out = cli("queue", "new", "--bogus")
    assert out.returncode == 2 and "--bogus" in out.stderr


def test_serve_hosts_queues_and_nothing_else(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            JUPYTER,
            "compute-queue",
            "serve",
            "--port",
            str(port),
            "--token",
            "sekret",
            "--data-dir",
            str(tmp_path / "data"),
            "--allow-root",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "config")},
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        url = None
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                pytest.fail(f"serve exited early: {proc.stderr.read() if proc.stderr else ''}")
            match = re.match(r"compute-queue host: (\S+)", line)
            url = match.group(1) if match else None
        assert url == f"http://localhost:{port}/compute-queue/"
        url = url.replace("localhost", "127.0.0.1")
        assert request(url + "healthz") == (200, {"ok": True})
        status, answer = request(url + "q/demo", "sekret", {"image": "busybox", "command": "true"})
        assert status == 200 and answer["state"] == "Queued"
        status, job = request(url + f"j/{answer['jobId']}", "sekret")
        assert status == 200 and job["runs"][0]["queue"] == "demo"
        assert request(url + "q/demo")[0] == 401
        root = f"http://127.0.0.1:{port}/"
        assert request(root + "api/terminals", "sekret")[0] == 404
        status, contents = request(root + "api/contents", "sekret")
        assert status == 200 and contents["content"] == []
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
