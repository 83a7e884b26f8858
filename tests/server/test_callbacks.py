"""Callbacks through a real Jupyter server: the submission envelope over HTTP and the Python
client's ``submit(callbacks=…)``, to a real receiver on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from jupyter_compute_queue.client.client import Client

from ..receiver import Receiver, receiving
from .conftest import Fetch, body

JOB = {"image": "busybox", "command": "echo callbacks"}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with receiving() as r:
        yield r


async def test_envelope_and_client_callbacks(
    fetch: Fetch, jp_serverapp: Any, jp_http_port: int, jp_base_url: str, receiver: Receiver
) -> None:
    envelope = {"definition": JOB, "callbacks": {"queued": f"{receiver.url}/http"}}
    r = await fetch("q", "q", method="POST", json=envelope)
    assert r.code == 200, r.body
    answer = body(r)
    await receiver.wait(lambda: bool(receiver.delivered("/http")))
    assert receiver.delivered("/http") == [
        {
            "jobId": answer["jobId"],
            "runId": answer["runId"],
            "queue": "q",
            "namespace": "_",
            "state": "Queued",
            "reason": None,
        }
    ]

    token = jp_serverapp.identity_provider.token
    client = Client(f"http://127.0.0.1:{jp_http_port}{jp_base_url}", token, queue="q")
    job = await asyncio.to_thread(
        client.submit,
        {**JOB, "command": "echo other"},
        namespace="script:1",
        callbacks={"queued": f"{receiver.url}/client"},
    )
    await receiver.wait(lambda: bool(receiver.delivered("/client")))
    [sent] = receiver.delivered("/client")
    assert (sent["jobId"], sent["runId"], sent["namespace"]) == (job.job_id, job.run_id, "script:1")


@pytest.mark.parametrize("cq_config", [{"public": True}])
async def test_public_host_refuses_a_private_callback(fetch: Fetch) -> None:
    envelope = {"definition": JOB, "callbacks": {"finished": "https://127.0.0.1:9/x"}}
    anonymous = {"Authorization": ""}  # jp_fetch adds the Jupyter token unless told otherwise
    r = await fetch("q", "pub", method="POST", json=envelope, headers=anonymous)
    assert r.code == 400
    assert body(r)["error"].startswith("callbacks.finished: 127.0.0.1 resolves to 127.0.0.1")
