"""The job page's server side: a static shell with a strict CSP, its script, worker tokens."""

from __future__ import annotations

import html
import json
import re
from typing import Any

import pytest

from jupyter_compute_queue.host.access import worker_identity

from .conftest import BASE_URL, Fetch, body


def page_config(text: str) -> dict[str, Any]:
    match = re.search(r'data-config="([^"]*)"', text)
    assert match, text
    config: dict[str, Any] = json.loads(html.unescape(match.group(1)))
    return config


async def test_the_page_is_a_static_shell_with_a_strict_policy(fetch: Fetch) -> None:
    reply = await fetch("ui/")
    assert reply.code == 200
    assert reply.headers["Content-Type"].startswith("text/html")
    csp = reply.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    text = reply.body.decode()
    assert page_config(text) == {"baseUrl": BASE_URL, "public": False, "version": "0.1.0"}
    assert '<script type="module" src="page.js?v=0.1.0">' in text
    assert "_xsrf" in reply.headers.get("Set-Cookie", "")  # for the page's POSTs

    script = await fetch("ui/page.js")
    assert script.code == 200
    assert script.headers["Content-Type"].startswith("text/javascript")
    assert b"compute-queue" in script.body
    assert (await fetch("ui/other.js")).code == 404


@pytest.mark.parametrize("cq_config", [{"public": True}])
async def test_the_page_knows_the_host_is_public(fetch: Fetch) -> None:
    reply = await fetch("ui/", headers={"Authorization": ""})
    assert page_config(reply.body.decode())["public"] is True


async def test_a_user_gets_the_worker_command_for_a_queue(fetch: Fetch, jp_serverapp: Any) -> None:
    answer = body(await fetch("q", "gpu-box", "worker-token"))
    secret = jp_serverapp.web_app.settings["compute_queue"].secret
    identity = worker_identity(secret, answer["token"])
    assert identity is not None and identity.queues == frozenset({"gpu-box"})
    assert answer["url"].endswith(BASE_URL)
    assert answer["command"] == (
        f"jupyter compute-queue worker gpu-box --url {answer['url']} --token {answer['token']}"
    )
    assert (await fetch("q", "bad%20name", "worker-token")).code == 400
