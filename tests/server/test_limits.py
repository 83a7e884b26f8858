"""The caps of a public host (docs/host.md, "Limits") on a real server: waiting runs and
submissions per queue, blob bytes per client and per host. Each cap reached is a 429 naming the
limit and its value, with Retry-After; time moves by hand, never by sleeping."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from tornado.httpclient import HTTPResponse

from jupyter_compute_queue.host.access import ANONYMOUS, Identity
from jupyter_compute_queue.host.limits import (
    _MAX_BUCKETS,
    LimitConfig,
    Limits,
    TokenBucket,
    TooManyRequests,
    _Buckets,
)
from jupyter_compute_queue.host.service_base import TooLarge

from ..conftest import Clock
from .conftest import Fetch, body

NOBODY = {"Authorization": ""}  # jp_fetch adds the Jupyter token unless told otherwise


def job(n: int) -> dict[str, Any]:
    return {"image": "busybox", "command": ["echo", str(n)]}


def blob(size: int, seed: int = 0) -> tuple[str, bytes]:
    data = bytes([seed]) * size
    return hashlib.sha256(data).hexdigest(), data


def from_client(address: str) -> dict[str, str]:
    """An anonymous caller at ``address``."""
    return {**NOBODY, "X-Real-Ip": address}


def assert_capped(r: HTTPResponse, limit: str, retry_after: int | None = None) -> None:
    assert r.code == 429, (r.code, r.body)
    message = body(r)["error"]
    assert limit in message and "retry in" in message, message
    seconds = int(r.headers["Retry-After"])
    assert f"retry in {seconds} s" in message
    if retry_after is not None:
        assert seconds == retry_after, message


@pytest.fixture(autouse=True)
def behind_a_proxy(http_server: Any) -> None:
    """The server trusts X-Real-Ip (``ServerApp.trust_xheaders``), so tests can be several
    clients. pytest-jupyter builds its own HTTPServer, so the flag is set on it directly."""
    http_server.xheaders = True


@pytest.fixture
async def clock(jp_serverapp: Any) -> AsyncIterator[Clock]:
    """The caps' clock, moved by hand."""
    limits = jp_serverapp.web_app.settings["compute_queue"].limits
    limits.clock = moved = Clock()
    yield moved


async def counts(fetch: Fetch, queue: str) -> dict[str, int]:
    r = await fetch("q", queue, "status")
    assert r.code == 200
    return body(r)["counts"]  # type: ignore[no-any-return]


# --- waiting runs per queue ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "cq_config", [{"public": True, "max_queued_runs": 3, "max_submissions_per_minute": 0}]
)
async def test_a_full_queue_refuses_strangers_until_a_place_frees(fetch: Fetch) -> None:
    answers = [
        body(await fetch("q", "pub", method="POST", json=job(i), headers=NOBODY)) for i in range(2)
    ]
    assert [a["state"] for a in answers] == ["Queued", "Queued"]
    # A batch that does not fit is refused whole: nothing of it is queued.
    r = await fetch("q", "pub", method="POST", json=[job(10), job(11)], headers=NOBODY)
    assert_capped(r, "max_queued_runs = 3", retry_after=30)
    assert "queue 'pub' is full: 2 runs wait and 2 more" in body(r)["error"]
    assert (await counts(fetch, "pub"))["Queued"] == 2
    r = await fetch("q", "pub", method="POST", json=job(2), headers=NOBODY)
    assert r.code == 200
    r = await fetch("q", "pub", "j", method="POST", json=job(3), headers=NOBODY)  # the alias
    assert_capped(r, "max_queued_runs = 3", retry_after=30)
    # Other queues have their own places; the host's own users are never capped here.
    assert (await fetch("q", "other", method="POST", json=job(3), headers=NOBODY)).code == 200
    assert (await fetch("q", "pub", method="POST", json=job(4))).code == 200
    assert (await counts(fetch, "pub"))["Queued"] == 4
    # Copying a job into the full queue is a submission to it.
    other = body(await fetch("q", "other", method="GET", headers=NOBODY))["runs"][0]["jobId"]
    r = await fetch("j", other, "copy", method="POST", json={"queue": "pub"}, headers=NOBODY)
    assert_capped(r, "max_queued_runs = 3")
    # A batch bigger than the queue may ever hold cannot wait its way in: 413, not 429.
    r = await fetch("q", "other", method="POST", json=[job(i) for i in range(4)], headers=NOBODY)
    assert r.code == 413 and "max_queued_runs = 3" in body(r)["error"]
    assert "Retry-After" not in r.headers
    # Two runs leave the queue (cancelled): one submission fits again, the next does not.
    for answer in answers:
        r = await fetch("q", "pub", "j", answer["jobId"], "cancel", method="POST", body=b"")
        assert r.code == 200
    r = await fetch("q", "pub", method="POST", json=[job(5)], headers=NOBODY)
    assert r.code == 200 and body(r)[0]["state"] == "Queued"
    assert (await fetch("q", "pub", method="POST", json=job(6), headers=NOBODY)).code == 429


@pytest.mark.parametrize("cq_config", [{"public": True, "max_queued_runs": 1}])
async def test_the_private_queue_answers_401_not_429(fetch: Fetch) -> None:
    assert (await fetch("q", "local", method="POST", json=job(0))).code == 200
    r = await fetch("q", "local", method="POST", json=job(1), headers=NOBODY)
    assert r.code == 401 and "Retry-After" not in r.headers


@pytest.mark.parametrize("cq_config", [{"max_queued_runs": 1, "max_submissions_per_minute": 1}])
async def test_a_private_host_has_no_caps_by_default(fetch: Fetch) -> None:
    for i in range(3):
        assert (await fetch("q", "q", method="POST", json=job(i))).code == 200
    assert (await counts(fetch, "q"))["Queued"] == 3


@pytest.mark.parametrize("cq_config", [{"limit_scope": "all", "max_queued_runs": 1}])
async def test_scope_all_caps_the_hosts_own_users(fetch: Fetch) -> None:
    assert (await fetch("q", "local", method="POST", json=job(0))).code == 200
    assert_capped(await fetch("q", "local", method="POST", json=job(1)), "max_queued_runs = 1")


@pytest.mark.parametrize(
    "cq_config", [{"public": True, "limit_scope": "off", "max_queued_runs": 1}]
)
async def test_scope_off_caps_nobody(fetch: Fetch) -> None:
    for i in range(3):
        r = await fetch("q", "pub", method="POST", json=job(i), headers=NOBODY)
        assert r.code == 200


# --- submissions per minute per queue -----------------------------------------------------------


@pytest.mark.parametrize(
    "cq_config", [{"public": True, "max_queued_runs": 0, "max_submissions_per_minute": 3}]
)
async def test_submissions_per_minute_refill_as_the_minute_passes(
    fetch: Fetch, clock: Clock
) -> None:
    async def submit(*items: dict[str, Any], queue: str = "pub") -> HTTPResponse:
        payload = list(items) if len(items) > 1 else items[0]
        return await fetch("q", queue, method="POST", json=payload, headers=NOBODY)

    assert (await submit(job(0), job(1))).code == 200
    # A submission that fails uses none of the budget.
    assert (await submit({"image": "x", "shmSize": "huge"})).code == 400
    assert (await submit(job(2))).code == 200
    # The bucket is empty; one token comes back every 60 / 3 = 20 seconds.
    assert_capped(await submit(job(3)), "max_submissions_per_minute = 3", retry_after=20)
    assert "queue 'pub'" in body(await submit(job(3)))["error"]
    assert (await submit(job(3), queue="pub2")).code == 200  # another queue, another budget
    assert (await fetch("q", "pub", method="POST", json=job(3))).code == 200  # the owner
    clock.advance(19)
    assert_capped(await submit(job(3)), "max_submissions_per_minute = 3", retry_after=1)
    clock.advance(1)
    assert (await submit(job(4))).code == 200
    # A batch needs its whole share at once: two tokens are 40 s away.
    assert_capped(await submit(job(5), job(6)), "max_submissions_per_minute", retry_after=40)
    clock.advance(40)
    assert (await submit(job(5), job(6))).code == 200
    # A whole minute later the full burst is back.
    clock.advance(60)
    assert (await submit(job(7), job(8), job(9))).code == 200
    clock.advance(60)
    r = await submit(*[job(i) for i in range(10, 14)])
    assert r.code == 413 and "max_submissions_per_minute = 3" in body(r)["error"]


# --- blob bytes per client and per host ---------------------------------------------------------


@pytest.mark.parametrize(
    "cq_config",
    [
        {
            "public": True,
            "max_blob_bytes_per_client_hour": 1000,
            "max_blob_bytes_per_host_hour": 1500,
        }
    ],
)
async def test_blob_bytes_per_client_and_per_host(fetch: Fetch, clock: Clock) -> None:
    async def put(address: str, size: int, seed: int) -> tuple[str, HTTPResponse]:
        key, data = blob(size, seed)
        r = await fetch("f", key, method="PUT", body=data, headers=from_client(address))
        return key, r

    assert (await put("10.0.0.1", 600, 1))[1].code == 201
    # 600 more from the same address would pass its 1000 bytes an hour: 200 bytes are missing,
    # which come back in 200 * 3600 / 1000 = 720 s.
    key, r = await put("10.0.0.1", 600, 2)
    assert_capped(r, "max_blob_bytes_per_client_hour = 1000", retry_after=720)
    assert "from 10.0.0.1" in body(r)["error"]
    assert (await fetch("f", key, "exists")).code == 404  # refused before a byte was kept
    # Another address has its own budget, but the host's 1500 bytes an hour are shared.
    assert (await put("10.0.0.2", 600, 3))[1].code == 201
    _, r = await put("10.0.0.3", 600, 4)
    assert_capped(r, "max_blob_bytes_per_host_hour = 1500", retry_after=720)
    # The host's own users are not capped.
    key, data = blob(600, 5)
    assert (await fetch("f", key, method="PUT", body=data)).code == 201
    # More than an hour's budget at once can never pass: 413.
    _, r = await put("10.0.0.4", 1001, 6)
    assert r.code == 413 and "max_blob_bytes_per_client_hour = 1000" in body(r)["error"]
    clock.advance(720)
    assert (await put("10.0.0.1", 600, 2))[1].code == 201


@pytest.mark.parametrize("cq_config", [{"public": True, "max_blob_bytes_per_client_hour": 1000}])
async def test_a_chunked_upload_is_charged_as_it_comes(fetch: Fetch, clock: Clock) -> None:
    """Without Content-Length the size is unknown up front: the bytes are counted as they
    arrive, and the upload over the cap is refused and not kept."""

    def chunked(data: bytes) -> Any:
        async def produce(write: Any) -> None:
            for start in range(0, len(data), 100):
                await write(data[start : start + 100])

        return produce

    first, data = blob(700, 1)
    r = await fetch(
        "f", first, method="PUT", body_producer=chunked(data), headers=from_client("10.0.0.9")
    )
    assert r.code == 201
    second, data = blob(700, 2)
    r = await fetch(
        "f", second, method="PUT", body_producer=chunked(data), headers=from_client("10.0.0.9")
    )
    assert_capped(r, "max_blob_bytes_per_client_hour = 1000")
    assert (await fetch("f", second, "exists")).code == 404
    assert (await fetch("f", first, "exists")).code == 200


# --- the buckets themselves ---------------------------------------------------------------------


def test_a_refused_upload_charges_nothing() -> None:
    limits = Limits(
        LimitConfig(
            public=True, max_blob_bytes_per_client_hour=1000, max_blob_bytes_per_host_hour=800
        ),
        clock=Clock(),
    )
    with pytest.raises(TooLarge, match="max_blob_bytes_per_host_hour = 800"):
        limits.blob_bytes(ANONYMOUS, "10.0.0.1", 900)
    limits.blob_bytes(ANONYMOUS, "10.0.0.1", 700)  # the client's 1000 were not touched
    with pytest.raises(TooManyRequests, match="max_blob_bytes_per_client_hour") as refused:
        limits.blob_bytes(ANONYMOUS, "10.0.0.1", 400)
    assert refused.value.retry_after == 360  # 100 bytes missing, at 1000 an hour
    # The host's bucket was not charged by the refusal either: 100 bytes are left in it.
    limits.blob_bytes(ANONYMOUS, "10.0.0.2", 100)
    limits.blob_bytes(Identity("user", "owner"), "10.0.0.1", 10_000)  # not capped


def test_buckets_stay_bounded_and_forget_idle_clients_first() -> None:
    clock = Clock()
    buckets = _Buckets(10, 60.0)
    for i in range(_MAX_BUCKETS - 1):
        buckets.get(f"busy{i}", clock()).take(1, clock())
    buckets.get("idle", clock())  # full: holds nothing
    buckets.get("new", clock()).take(1, clock())
    assert len(buckets.buckets) == _MAX_BUCKETS // 2 + 1
    assert "idle" not in buckets.buckets and "new" in buckets.buckets
    assert f"busy{_MAX_BUCKETS - 2}" in buckets.buckets and "busy0" not in buckets.buckets
    # A clock that steps back refills nothing, and a bucket never holds more than its capacity.
    bucket = TokenBucket(10, 60.0, 0.0, clock())
    assert bucket.wait(1, clock() - 100) == pytest.approx(6.0)
    clock.advance(10_000)
    assert bucket.wait(10, clock()) == 0 and bucket.level == 10
