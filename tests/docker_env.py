"""Docker for the tests: a client, the engine, the locally built test images, a loopback registry.

Loaded for the whole suite by ``pytest_plugins`` in ``tests/conftest.py``, so any test can ask
for ``docker_engine``, ``test_images`` or ``registry``. ``scripts/test.sh`` prepares everything
first (``scripts/docker.sh`` starts an engine, ``scripts/test-images.sh`` builds the images; no
registry is needed). When something is missing, the fixtures skip with a message saying what
and how to get it, except under ``CI=true``, where a skipped Docker test would hide a broken
setup: there they fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest

if TYPE_CHECKING:
    import docker

# Built by scripts/test-images.sh (keep the names in step with it).
BUSYBOX_IMAGE = "cq-test/busybox:1"
PYTHON_IMAGE = "cq-test/python:1"
# The engine this project supports at least (Debian 12's docker.io 20.10).
MIN_API_VERSION = (1, 41)
REGISTRY_START_TIMEOUT = 15.0


@dataclass(frozen=True)
class ImageNames:
    """The test images, by name (both are local only: never pulled)."""

    busybox: str = BUSYBOX_IMAGE
    python: str = PYTHON_IMAGE


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def missing(what: str, fix: str) -> NoReturn:
    """Skips the test, saying what is missing and how to get it; fails it under CI=true."""
    message = f"{what}; {fix}"
    if in_ci():
        pytest.fail(f"CI=true, so Docker tests must run: {message}", pytrace=False)
    pytest.skip(message)


def api_version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def docker_client(timeout: int = 120) -> docker.DockerClient:
    """A client from the environment (DOCKER_HOST, DOCKER_CERT_PATH, …).

    The API version is negotiated with the engine (``version=None``), never pinned: the engine
    here speaks 1.41 while the SDK's newest is higher.
    """
    import docker

    return docker.DockerClient.from_env(version=None, timeout=timeout)


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[docker.DockerClient]:
    """A client to an engine that answers; skipped (failed under CI) when there is none."""
    try:
        import docker  # noqa: F401
    except ImportError:
        missing("the Python docker SDK is not installed", "run: bash scripts/install.sh")
    try:
        client = docker_client()
        client.ping()
    except Exception as error:
        host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        missing(
            f"no Docker engine answers at {host} ({type(error).__name__}: {error})",
            "run: bash scripts/docker.sh (as root it installs and starts one; "
            "otherwise it prints what to run)",
        )
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def test_images(docker_engine: docker.DockerClient) -> ImageNames:
    """The locally built test images; skipped (failed under CI) when one is missing."""
    import docker

    names = ImageNames()
    absent = []
    for name in (names.busybox, names.python):
        try:
            docker_engine.images.get(name)
        except docker.errors.ImageNotFound:
            absent.append(name)
    if absent:
        missing(
            f"test image{'s' if len(absent) > 1 else ''} {', '.join(absent)} not built",
            "run: bash scripts/test-images.sh",
        )
    return names


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _registry_answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private registry on a free loopback port, empty, for this test only.

    Debian's ``docker-registry serve CONFIG.yml``, storing under a temp folder; yields
    ``localhost:PORT`` (the engine pushes to and pulls from loopback registries without TLS).
    """
    binary = shutil.which("docker-registry") or (
        "/usr/bin/docker-registry" if Path("/usr/bin/docker-registry").exists() else None
    )
    if binary is None:
        missing(
            "Debian's docker-registry is not installed",
            "run: bash scripts/docker.sh as root, or "
            "sudo apt-get install -y --no-install-recommends docker-registry",
        )
    folder = tmp_path_factory.mktemp("registry")
    log_path = folder / "registry.log"
    for _attempt in range(3):
        port = free_loopback_port()
        # JSON is YAML: no quoting surprises in the paths.
        config = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(folder / "data")},
                "delete": {"enabled": True},
            },
            "http": {"addr": f"127.0.0.1:{port}"},
        }
        config_path = folder / "config.yml"
        config_path.write_text(json.dumps(config, indent=2))
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [binary, "serve", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + REGISTRY_START_TIMEOUT
        while process.poll() is None and time.monotonic() < deadline:
            if _registry_answers(port):
                try:
                    yield f"localhost:{port}"
                finally:
                    _stop(process)
                return
            time.sleep(0.05)
        _stop(process)
        # Exited early: most likely another process took the port in between; try another.
    tail = ""
    with contextlib.suppress(OSError):
        tail = log_path.read_text(errors="replace")[-2000:]
    missing(f"docker-registry did not start; its log:\n{tail}", f"see {log_path}")
