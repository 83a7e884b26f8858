"""A real Jupyter server with the extension, under a non-root base URL."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_jupyter.jupyter_server as _jupyter_fixtures
from tornado.httpclient import HTTPClientError, HTTPResponse

# pytest-jupyter's fixtures (jp_fetch, jp_serverapp …) without its hooks: pytest-asyncio runs
# every coroutine test in this suite, so the server must live on pytest-asyncio's loop.
globals().update(
    {
        name: value
        for name, value in vars(_jupyter_fixtures).items()
        if (name.startswith(("jp_", "http_server")) or name in ("io_loop", "echo_kernel_spec"))
        and name != "jp_asyncio_loop"
    }
)


@pytest.fixture
async def jp_asyncio_loop() -> asyncio.AbstractEventLoop:
    """The loop the test runs on; pytest-jupyter's fixtures start the server on it."""
    return asyncio.get_running_loop()


BASE_URL = "/cq-base/"

Fetch = Callable[..., Awaitable[HTTPResponse]]


@pytest.fixture
def jp_base_url() -> str:
    return BASE_URL


@pytest.fixture
def cq_config() -> dict[str, Any]:
    """Extra ComputeQueueApp settings for a test (override in a module)."""
    return {}


@pytest.fixture
def extra_server_config() -> dict[str, Any]:
    """Other top-level config sections for a test (e.g. ``S3BlobStore``; override in a
    module)."""
    return {}


@pytest.fixture
def jp_server_config(
    tmp_path: Path, cq_config: dict[str, Any], extra_server_config: dict[str, Any]
) -> dict[str, Any]:
    return {
        **extra_server_config,
        "ServerApp": {"jpserver_extensions": {"jupyter_compute_queue": True}},
        # No local worker unless a test asks for one (it would take the tests' runs).
        "ComputeQueueApp": {
            "data_dir": str(tmp_path / "cq-data"),
            "local_worker": False,
            **cq_config,
        },
    }


@pytest.fixture
def fetch(jp_fetch: Fetch) -> Fetch:
    """jp_fetch under compute-queue/, answering errors instead of raising them."""

    async def call(*parts: str, **kwargs: Any) -> HTTPResponse:
        if "json" in kwargs:
            kwargs["body"] = json.dumps(kwargs.pop("json"))
        kwargs.setdefault("raise_error", False)
        kwargs.setdefault("follow_redirects", False)
        try:
            return await jp_fetch("compute-queue", *parts, **kwargs)
        except HTTPClientError as exc:  # only for redirects, which tornado raises
            assert exc.response is not None
            return exc.response

    return call


def body(response: HTTPResponse) -> Any:
    return json.loads(response.body)
