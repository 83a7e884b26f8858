"""S3 for the tests: moto's S3 server on a loopback port, one bucket per test.

Loaded for the whole suite by ``pytest_plugins`` in ``tests/conftest.py``. ``moto_server`` runs
from the venv (``moto[server]`` is a test dependency) once per test process, ready in about
0.3 s. When it is missing the fixtures skip saying so, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.docker_env import free_loopback_port, in_ci

START_TIMEOUT = 60.0
#: What boto3 signs with (moto checks no signature); set for every S3 test so that neither a
#: developer's real credentials nor a slow instance-metadata lookup come into play.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "cq-test",
    "AWS_SECRET_ACCESS_KEY": "cq-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
}
S3_STORE = "jupyter_compute_queue.host.blobs.s3.S3BlobStore"


def missing(what: str, fix: str) -> NoReturn:
    """Skip, saying what is missing and how to get it; fail under CI=true."""
    message = f"{what}; {fix}"
    if in_ci():
        pytest.fail(f"CI=true, so S3 tests must run: {message}", pytrace=False)
    pytest.skip(message)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/", timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means it is up
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The endpoint URL of a moto S3 server for this test process."""
    binary = Path(sys.executable).with_name("moto_server")
    try:
        import boto3  # noqa: F401
    except ImportError:
        missing("boto3 is not installed", "run: bash scripts/install.sh")
    if not binary.exists():
        missing(f"{binary} is not installed (moto[server])", "run: bash scripts/install.sh")
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    for _attempt in range(3):
        port = free_loopback_port()
        url = f"http://127.0.0.1:{port}"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [str(binary), "-H", "127.0.0.1", "-p", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while process.poll() is None and time.monotonic() < deadline:
            if _answers(url):
                try:
                    yield url
                finally:
                    process.terminate()
                    try:
                        process.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait()
                return
            time.sleep(0.05)
        if process.poll() is None:
            process.kill()
            process.wait()
    tail = ""
    with contextlib.suppress(OSError):
        tail = log_path.read_text(errors="replace")[-2000:]
    missing(f"moto_server did not start; its log:\n{tail}", f"see {log_path}")


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Test credentials in the environment (boto3's usual chain reads them)."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    return AWS_ENV


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=AWS_ENV["AWS_DEFAULT_REGION"],
        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
    )


@pytest.fixture
def s3_bucket(moto_server: str, aws_env: dict[str, str]) -> Iterator[dict[str, Any]]:
    """A fresh bucket; yields the ``S3BlobStore`` settings that use it."""
    client = s3_client(moto_server)
    bucket = f"cq-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    try:
        yield {"bucket": bucket, "endpoint_url": moto_server, "prefix": "blobs/"}
    finally:
        with contextlib.suppress(Exception):
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                for obj in page.get("Contents", []):
                    client.delete_object(Bucket=bucket, Key=obj["Key"])
            client.delete_bucket(Bucket=bucket)
        client.close()
