"""The README's first command, ``bash scripts/run.sh``, starts the product: JupyterLab serving
``notebooks/`` with the extension, and its local worker running jobs of queue ``local``.

The install half of the script is what ``.ci/run`` has just done for the whole suite (and
reinstalling the package under the other tests would pull it from under them), so the test sets
``COMPUTE_QUEUE_SKIP_INSTALL=1`` and checks the start half. Jupyter's data and runtime folders
are the test's own, so the host's state and lock are too.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.docker_env import ImageNames, free_loopback_port

REPO = Path(__file__).resolve().parent.parent
# The servers are on 127.0.0.1: ignore any proxy settings.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Started:
    def __init__(self, url: str, token: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.url, self.token, self.process, self.log = url, token, process, log

    def api(self, method: str, path: str, payload: Any = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Authorization", f"token {self.token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        with DIRECT.open(request, timeout=30) as answer:
            return json.loads(answer.read())

    def until(self, what: str, check: Any, timeout: float = 90) -> Any:
        """Poll ``check`` until it gives something true (failing early if the script ended)."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"run.sh ended: {self.tail()}"
            try:
                value = check()
            except (OSError, urllib.error.URLError):
                value = None
            if value:
                return value
            assert time.monotonic() < deadline, f"not within {timeout} s: {what}\n{self.tail()}"
            time.sleep(0.2)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture
def started(tmp_path: Path, test_images: ImageNames) -> Iterator[Started]:
    port = free_loopback_port()
    token = uuid.uuid4().hex
    log = tmp_path / "run.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPUTE_QUEUE_", "JUPYTER"))}
    env.update(
        COMPUTE_QUEUE_SKIP_INSTALL="1",
        JUPYTER_DATA_DIR=str(tmp_path / "data"),
        JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
        JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
    )
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                "bash",
                str(REPO / "scripts" / "run.sh"),
                "--no-browser",
                "--ip=127.0.0.1",
                f"--port={port}",
                "--ServerApp.port_retries=0",
                f"--IdentityProvider.token={token}",
            ],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield Started(f"http://127.0.0.1:{port}/", token, process, log)
    finally:
        # SIGTERM: JupyterLab stops its kernels and its local worker (which removes its runs).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_run_sh_starts_lab_with_the_local_worker(started: Started, test_images: ImageNames) -> None:
    def local_worker() -> bool:
        status = started.api("GET", "compute-queue/q/local/status")
        return any(w.get("connected") for w in status["workers"])

    started.until("the local worker connected", local_worker)
    # JupyterLab itself, with the extension and the demo notebooks.
    page = urllib.request.Request(
        started.url + "lab", headers={"Authorization": f"token {started.token}"}
    )
    with DIRECT.open(page, timeout=30) as answer:
        html = answer.read().decode()
    # The page config lists the prebuilt extensions the page loads.
    assert '"name": "jupyter-compute-queue"' in html.replace('":"', '": "'), html[:2000]
    quickstart = started.api("GET", "api/contents/quickstart.ipynb?content=0")
    assert quickstart["type"] == "notebook"
    # And a job runs on the local worker.
    marker = uuid.uuid4().hex[:8]
    job = started.api(
        "POST",
        "compute-queue/q/local",
        {"image": test_images.busybox, "command": f"echo run-sh-{marker}"},
    )

    def finished() -> Any:
        record = started.api("GET", f"compute-queue/q/local/j/{job['jobId']}/result.json")
        return record if record["state"] == "Finished" else None

    record = started.until("the job finished", finished)
    assert record["reason"] == "Success", record
    logs = urllib.request.Request(
        started.url + f"compute-queue/q/local/j/{job['jobId']}/logs",
        headers={"Authorization": f"token {started.token}"},
    )
    with DIRECT.open(logs, timeout=30) as answer:
        assert f"run-sh-{marker}" in answer.read().decode()
