"""Bad input on a real server: oversized and malformed bodies, path traversal, odd queue names and
malformed websocket messages. Every answer is a 4xx naming the problem (never a 5xx), or for a
websocket an error message or a clean close; the host keeps serving others afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from typing import Any

import pytest
from tornado.httpclient import HTTPClientError, HTTPResponse
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClosedError

from .conftest import Fetch, body
from .scripted import Peer, Worker, WsFetch, watch

JOB = {"image": "busybox", "command": "echo hi"}
NOBODY = {"Authorization": ""}  # jp_fetch adds the Jupyter token unless told otherwise


def job(n: int) -> dict[str, Any]:
    return {"image": "busybox", "command": ["echo", str(n)]}


def assert_error(r: HTTPResponse, status: int, *words: str) -> str:
    """A JSON error of this status whose message has these words; the message."""
    assert r.code == status, (r.code, r.body[:300])
    assert r.headers["Content-Type"].startswith("application/json")
    message = body(r)["error"]
    assert isinstance(message, str)
    for word in words:
        assert word in message, (word, message)
    return message


async def queued(fetch: Fetch, queue: str = "q") -> int:
    r = await fetch("q", queue, "status")
    assert r.code == 200
    return int(body(r)["counts"]["Queued"])


async def still_serving(fetch: Fetch, jp_ws_fetch: WsFetch) -> None:
    """The host answers HTTP, takes a submission, and a fresh watcher gets its snapshot."""
    assert (await fetch("healthz")).code == 200
    answer = body(await fetch("q", "after", method="POST", json=job(999)))
    assert answer["state"] == "Queued"
    client = await watch(jp_ws_fetch, "after")
    await client.send({"type": "ping"})
    await client.expect("pong")
    client.close()


# --- oversized bodies: 413 ----------------------------------------------------------------------


@pytest.mark.parametrize("cq_config", [{"max_definition_bytes": 1000}])
async def test_a_definition_over_max_definition_bytes_is_413(fetch: Fetch) -> None:
    big = {"image": "x", "env": {"BIG": "x" * 1000}}
    assert_error(
        await fetch("q", "q", method="POST", json=big), 413, "definition: larger than 1000"
    )
    r = await fetch("q", "q", method="POST", json=[JOB, {"definition": big}])
    assert_error(r, 413, "[1]definition: larger than 1000 bytes")
    assert await queued(fetch) == 0  # the batch is refused whole


@pytest.mark.parametrize("cq_config", [{"max_submission_bytes": 10_000}])
async def test_a_submission_body_over_max_submission_bytes_is_413(
    fetch: Fetch, jp_ws_fetch: WsFetch
) -> None:
    batch = [job(i) for i in range(300)]
    assert len(json.dumps(batch)) > 10_000
    r = await fetch("q", "q", method="POST", json=batch)
    assert_error(r, 413, "max_submission_bytes = 10000", "blobs")
    assert await queued(fetch) == 0
    # Without Content-Length the host cannot refuse before the body: it stops reading at the
    # limit and drops the connection instead of buffering it all.
    data = json.dumps(batch).encode()

    async def produce(write: Any) -> None:
        for start in range(0, len(data), 1000):
            await write(data[start : start + 1000])

    try:
        r = await fetch("q", "q", method="POST", body_producer=produce)
    except (StreamClosedError, HTTPClientError, ConnectionError):
        pass
    else:
        assert 400 <= r.code < 500 or r.code == 599, r.code
    assert await queued(fetch) == 0
    # Under the limit, a batch is fine.
    r = await fetch("q", "q", method="POST", json=batch[:50])
    assert r.code == 200 and len(body(r)) == 50
    await still_serving(fetch, jp_ws_fetch)


@pytest.mark.parametrize("cq_config", [{"max_batch_size": 3}])
async def test_a_batch_over_max_batch_size_is_413(fetch: Fetch) -> None:
    r = await fetch("q", "q", method="POST", json=[job(i) for i in range(4)])
    assert_error(r, 413, "batch: 4 submissions", "max_batch_size = 3")
    assert await queued(fetch) == 0
    r = await fetch("q", "q", "j", method="POST", json=[job(i) for i in range(3)])
    assert r.code == 200 and len(body(r)) == 3


@pytest.mark.parametrize("cq_config", [{"max_blob_bytes": 1000}])
async def test_a_blob_over_max_blob_bytes_is_413_and_not_kept(fetch: Fetch) -> None:
    data = b"y" * 5000
    key = hashlib.sha256(data).hexdigest()
    assert_error(await fetch("f", key, method="PUT", body=data), 413, "over the limit of 1000")

    async def produce(write: Any) -> None:  # chunked: no Content-Length to refuse up front
        for start in range(0, len(data), 500):
            await write(data[start : start + 500])

    try:
        r = await fetch("f", key, method="PUT", body_producer=produce)
    except (StreamClosedError, HTTPClientError, ConnectionError):
        pass
    else:
        assert 400 <= r.code < 500 or r.code == 599, r.code
    assert (await fetch("f", key, "exists")).code == 404
    small = b"z" * 1000
    r = await fetch("f", hashlib.sha256(small).hexdigest(), method="PUT", body=small)
    assert r.code == 201


# --- malformed bodies and arguments: 400 --------------------------------------------------------


@pytest.mark.parametrize("depth", [65, 990, 100_000])
async def test_a_body_nested_too_deep_is_400(fetch: Fetch, depth: int) -> None:
    nested = "[" * depth + "]" * depth
    for parts, data in [
        (("q", "q"), nested),
        (("q", "q"), f'{{"image": "x", "inputs": {{"a": {{"type": "json", "value": {nested}}}}}}}'),
        (("j", "0" * 64, "copy"), f'{{"queue": {nested}}}'),
    ]:
        r = await fetch(*parts, method="POST", body=data)
        assert_error(r, 400, "nested deeper than 64 levels")
    # Deep but within the limit: a json input nested 50 levels is a fine definition.
    inner = "[" * 50 + "]" * 50
    definition = f'{{"image": "x", "inputs": {{"a": {{"type": "json", "value": {inner}}}}}}}'
    assert (await fetch("q", "q", method="POST", body=definition)).code == 200


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ('{"image": "x", "requirements": {"cpus": 1e400}}', "1e400 is out of range"),
        ('{"image": "x", "requirements": {"cpus": NaN}}', "NaN is not a JSON number"),
        ('{"image": "x", "maxDuration": Infinity}', "Infinity is not a JSON number"),
        ('{"image": "x", "inputs": {"a": {"type": "json", "value": -Infinity}}}', "-Infinity"),
        ('{"image": "x", "requirements": {"gpus": 1000000000000000000000}}', "gpus"),
        ('{"image": "x", "requirements": {"cpus": 1' + "0" * 400 + "}}", "cpus"),
        ('{"image": "x"', "not valid JSON"),
        ("\xff", "not valid JSON"),
        # Python's json reads a lone surrogate escape into a string no encoder takes.
        ('{"image": "x", "env": {"A": "a\\ud800"}}', "lone UTF-16 surrogate (\\ud800"),
        ('{"job": {"image": "x"}, "namespace": "\\udfff"}', "lone UTF-16 surrogate (\\udfff"),
    ],
)
async def test_numbers_json_cannot_hold_are_400(fetch: Fetch, text: str, what: str) -> None:
    data = text.encode("latin-1") if text == "\xff" else text.encode()
    assert_error(await fetch("q", "q", method="POST", body=data), 400, what)


async def test_query_numbers_must_be_ascii_digits(fetch: Fetch) -> None:
    """``str.isdigit`` takes '²' (which int() refuses) and '١٢': both are a 400 naming the
    argument."""
    answer = body(await fetch("q", "q", method="POST", json=JOB))
    for value in ("²", "١٢", "-1", "1.5", "", "0x10"):
        r = await fetch("q", "q", params={"limit": value})
        assert_error(r, 400, "limit")
        r = await fetch("j", answer["jobId"], "logs", params={"since": value})
        assert_error(r, 400, "since")
    assert (await fetch("q", "q", params={"limit": "7"})).code == 200


async def test_a_cursor_no_page_ever_gave_is_400(fetch: Fetch) -> None:
    """Found by fuzzing: a cursor past SQLite's integers was a 500 (OverflowError)."""
    for cursor in (str(2**63), "9" * 40, "0", "x"):
        assert_error(await fetch("q", "q", params={"cursor": cursor}), 400, "cursor")


# --- path traversal -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "path", "why"),
    [
        ("inputs", "../x", "'..' segment"),
        ("inputs", "a/../../x", "'..' segment"),
        ("inputs", "/etc/passwd", "must be relative"),
        ("inputs", "a\x00b", "NUL"),
        ("inputs", "a\\..\\b", "backslash"),
        ("inputs", "", "empty"),
        ("inputs", "./a", "'.' or '..' segment"),
        ("inputs", "a//b", "empty"),
        ("configFiles", "../x", "'..' segment"),
        ("configFiles", "/etc/../../x", "'..' segment"),
    ],
)
async def test_input_paths_that_leave_inputs_are_400(
    fetch: Fetch, field: str, path: str, why: str
) -> None:
    definition = {"image": "x", field: {path: {"type": "utf8", "value": "x"}}}
    r = await fetch("q", "q", method="POST", json=definition)
    assert_error(r, 400, f"{field}.{path}", why)
    assert await queued(fetch) == 0


async def test_traversal_in_file_routes_serves_nothing(fetch: Fetch) -> None:
    """Input and output routes look a path up in the job's definition or run record, never on
    disk: a way out is just a path the job does not have."""
    definition = {"image": "x", "inputs": {"data/x.csv": {"type": "utf8", "value": "a,b\n"}}}
    job_id = body(await fetch("q", "q", method="POST", json=definition))["jobId"]
    assert (await fetch("j", job_id, "inputs", "data", "x.csv")).body == b"a,b\n"
    for kind in ("inputs", "outputs"):
        for path in (
            ("..", "..", "..", "etc", "passwd"),
            ("data", "..", "..", "state.sqlite"),
            ("", "etc", "passwd"),
            ("data\\..\\..\\secret",),
            ("data", "x.csv\x00"),
        ):
            for prefix in (("j", job_id), ("q", "q", "j", job_id)):
                r = await fetch(*prefix, kind, *path)
                assert_error(r, 404, f"has no {kind[:-1]}")


async def test_traversal_in_raw_urls_serves_nothing(
    jp_http_port: int, jp_base_url: str, jp_auth_header: dict[str, str], fetch: Fetch
) -> None:
    """The same, with the URL sent as is (not escaped by the test client)."""
    from tornado.httpclient import AsyncHTTPClient

    definition = {"image": "x", "inputs": {"data/x.csv": {"type": "utf8", "value": "a,b\n"}}}
    job_id = body(await fetch("q", "q", method="POST", json=definition))["jobId"]
    root = f"http://127.0.0.1:{jp_http_port}{jp_base_url}compute-queue/"
    client = AsyncHTTPClient()
    for tail in (
        f"j/{job_id}/inputs/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        f"j/{job_id}/inputs/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        f"j/{job_id}/outputs/%2e%2e%2f%2e%2e%2fstate.sqlite",
        f"j/{job_id}/inputs/data%2fx.csv%00",
        "f/..%2F..%2F..%2Fetc%2Fpasswd",
        "f/%2e%2e",
        "f/" + "A" * 64,
        "f/" + "a" * 63,
        "f/" + "a" * 63 + "%2F",
        "f/" + "a" * 64 + "%00",
        "f/" + "a" * 63 + "%5C",
    ):
        response = await client.fetch(root + tail, headers=jp_auth_header, raise_error=False)
        assert response.code in (400, 404), (tail, response.code)
        message = body(response)["error"]
        if tail.startswith("f/"):
            assert response.code == 400 and "invalid blob key" in message, (tail, message)
        assert b"root:" not in response.body and b"SQLite" not in response.body


async def test_blob_keys_that_are_not_sha256_hex_are_400(fetch: Fetch) -> None:
    for key in ("..", "A" * 64, "a" * 63, "a" * 65, "a" * 63 + "\\", " " * 64, "a" * 63 + "\x00"):
        for method in ("GET", "HEAD", "PUT"):
            kwargs: dict[str, Any] = {"body": b"x"} if method == "PUT" else {}
            r = await fetch("f", key, method=method, **kwargs)
            if method == "HEAD":
                assert r.code == 400, (key, r.code)
            else:
                assert_error(r, 400, "invalid blob key")
        assert_error(await fetch("f", key, "exists"), 400, "invalid blob key")
    # With its slashes left as they are, a path is no key at all: no route.
    for method in ("GET", "PUT"):
        kwargs = {"body": b"x"} if method == "PUT" else {}
        r = await fetch("f", "../../etc/passwd", method=method, **kwargs)
        assert_error(r, 404, "no route")
    # A job referring to such a key is refused with the field named.
    definition = {"image": "x", "inputs": {"a": {"type": "key", "value": "../../etc/passwd"}}}
    assert_error(await fetch("q", "q", method="POST", json=definition), 400, "inputs.a")


async def test_a_worker_cannot_report_outputs_outside_the_outputs_folder(
    fetch: Fetch, jp_ws_fetch: WsFetch, jp_serverapp: Any
) -> None:
    service = await jp_serverapp.web_app.settings["compute_queue"].ready()
    data = b"out"
    key = hashlib.sha256(data).hexdigest()
    await service.blobs.put(key, data)
    out = {"key": key, "size": len(data)}
    worker, _ = await Worker.connect(jp_ws_fetch, "w1")
    answer = body(await fetch("q", "q", method="POST", json=JOB))
    assign = await worker.expect("assign")
    run_id, fence = assign["runId"], assign["fence"]
    for path in ("../../etc/cron.d/x", "/etc/passwd", "a/../../x", "a\\..\\..\\x", "a\x00b", ""):
        await worker.send(
            {
                "type": "result",
                "runId": run_id,
                "fence": fence,
                "reason": "Success",
                "exitCode": 0,
                "outputs": {path: out},
            }
        )
        error = (await worker.expect("error"))["error"]
        assert error.startswith("result: output"), (path, error)
    record = body(await fetch("j", answer["jobId"], "result.json"))
    assert record["state"] == "Running"
    # A backslash inside a name is a name (Linux allows it), and nested paths are fine.
    accepted = await worker.result(run_id, fence, outputs={"a\\b.txt": out, "d/e.txt": out})
    assert accepted["type"] == "accepted"
    assert set(accepted["run"]["outputs"]) == {"a\\b.txt", "d/e.txt"}


# --- queue names (SPEC §7) ----------------------------------------------------------------------


@pytest.mark.parametrize("cq_config", [{"public": True}])
async def test_queue_names_are_case_sensitive(fetch: Fetch, jp_ws_fetch: WsFetch) -> None:
    """``Local`` is not ``local``: it is an ordinary (public) queue, and the private queue's
    runs do not show through it."""
    private = body(await fetch("q", "local", method="POST", json=job(1)))
    assert_error(await fetch("q", "local", method="POST", json=job(2), headers=NOBODY), 401)
    public = body(await fetch("q", "Local", method="POST", json=job(2), headers=NOBODY))
    assert public["queue"] == "Local" and public["jobId"] != private["jobId"]
    listed = body(await fetch("q", "Local", headers=NOBODY))["runs"]
    assert [r["jobId"] for r in listed] == [public["jobId"]]
    assert body(await fetch("q", "Local", "status", headers=NOBODY))["counts"]["Queued"] == 1
    assert body(await fetch("q", "local", "status"))["counts"]["Queued"] == 1
    r = await fetch("q", "Local", "j", private["jobId"], headers=NOBODY)
    assert_error(r, 404, "not known")
    assert_error(await fetch("q", "local", "status", headers=NOBODY), 401)
    # The same job in both: two runs, one per queue.
    again = body(await fetch("q", "LOCAL", method="POST", json=job(1), headers=NOBODY))
    assert again["jobId"] == private["jobId"] and again["runId"] != private["runId"]


BAD_NAMES = [
    ("a%2Fb", "queue name 'a/b'"),
    ("x" * 129, "queue name"),
    (".hidden", "queue name '.hidden'"),
    ("-dash", "queue name '-dash'"),
    ("_under", "queue name '_under'"),
    ("..", "queue name '..'"),
    ("%2e%2e", "queue name '..'"),
    ("bad%20name", "queue name 'bad name'"),
    ("nul%00", "queue name"),
    ("caf%C3%A9", "queue name 'café'"),
]


async def test_odd_queue_names_are_400_or_404_with_a_message(
    jp_http_port: int, jp_base_url: str, jp_auth_header: dict[str, str], jp_ws_fetch: WsFetch
) -> None:
    from tornado.httpclient import AsyncHTTPClient, HTTPRequest
    from tornado.websocket import websocket_connect

    root = f"http://127.0.0.1:{jp_http_port}{jp_base_url}compute-queue/"
    client = AsyncHTTPClient()

    async def call(method: str, tail: str, payload: Any = None) -> HTTPResponse:
        data = None if payload is None else json.dumps(payload)
        return await client.fetch(
            root + tail, method=method, body=data, headers=jp_auth_header, raise_error=False
        )

    assert (await call("GET", "q/" + "x" * 128 + "/status")).code == 200
    for name, words in BAD_NAMES:
        for method, tail, payload in [
            ("POST", f"q/{name}", JOB),
            ("POST", f"q/{name}/j", JOB),
            ("GET", f"q/{name}", None),
            ("GET", f"q/{name}/status", None),
            ("GET", f"q/{name}/metrics", None),
            ("GET", f"q/{name}/j/{'0' * 64}", None),
            ("POST", f"q/{name}/j/{'0' * 64}/cancel", {}),
        ]:
            r = await call(method, tail, payload)
            assert_error(r, 400, words, "letters, digits")
        url = root.replace("http", "ws", 1) + f"q/{name}/ws"
        with pytest.raises(HTTPClientError) as refused:
            await websocket_connect(HTTPRequest(url, headers=jp_auth_header))
        assert refused.value.code == 400
    # The copy target is a queue name too.
    job_id = body(await call("POST", "q/q", JOB))["jobId"]
    r = await call("POST", f"j/{job_id}/copy", {"queue": "../local"})
    assert_error(r, 400, "queue name '../local'")
    # An empty name matches no route: a JSON 404 that says so.
    for tail in ("q//status", "q/", "q//j"):
        assert_error(await call("GET", tail), 404, "no route")


# --- malformed websocket messages ---------------------------------------------------------------


async def send_raw(peer: Peer, message: str | bytes, binary: bool = False) -> None:
    await peer.conn.write_message(message, binary=binary)


async def answer_of(peer: Peer, message: str | bytes, binary: bool = False) -> dict[str, Any]:
    await send_raw(peer, message, binary)
    return await peer.expect("error")


async def test_malformed_messages_on_the_queue_socket(fetch: Fetch, jp_ws_fetch: WsFetch) -> None:
    client = await watch(jp_ws_fetch)
    run_id = body(await fetch("q", "q", method="POST", json=JOB))["runId"]
    await client.expect("run", timeout=10)
    for junk, words in [
        ("not json", "not JSON"),
        ("", "not JSON"),
        ("[1, 2]", '"type"'),
        ('{"type": 5}', '"type"'),
        ('"just a string"', '"type"'),
        ('{"type": "dance"}', "unknown message type 'dance'"),
        ('{"type": "subscribe"}', "'runId' is missing"),
        ('{"type": "subscribe", "runId": ["x"]}', "'runId' has the wrong type"),
        (json.dumps({"type": "subscribe", "runId": run_id, "since": "0"}), "'since'"),
        (json.dumps({"type": "subscribe", "runId": run_id, "since": True}), "'since'"),
        (json.dumps({"type": "subscribe", "runId": run_id, "since": -1}), "'since'"),
        ('{"type": "subscribe", "runId": "x", "since": 1e400}', "'since'"),
        ('{"type": "unsubscribe", "runId": 7}', "'runId'"),
        ("[" * 100_000, "not JSON"),
    ]:
        assert words in (await answer_of(client, junk))["error"], junk
    # Binary frames: UTF-8 JSON is read as text; anything else is not JSON.
    assert "not JSON" in (await answer_of(client, b"\xff\xfe\x00", binary=True))["error"]
    await send_raw(client, b'{"type": "ping"}', binary=True)
    await client.expect("pong")
    # A subscription far past the end of the log is fine: nothing to send yet.
    await client.send({"type": "subscribe", "runId": run_id, "since": 10**30})
    await client.send({"type": "ping"})
    await client.expect("pong")
    client.close()


async def test_malformed_messages_on_the_worker_socket(fetch: Fetch, jp_ws_fetch: WsFetch) -> None:
    raw = Worker(await jp_ws_fetch("compute-queue", "worker"), "raw")
    base = {"type": "register", "protocol": 1, "id": "raw", "queues": ["q"]}
    for junk, words in [
        ("not json", "not JSON"),
        ("[" * 100_000, "not JSON"),
        ('{"type": "heartbeat"}', "register first"),
        ('{"type": "dance"}', "unknown message type 'dance'"),
        (json.dumps({**base, "capacity": {"cpus": 1, "gpus": "many"}}), "capacity"),
        (
            '{"type": "register", "protocol": 1, "id": "raw", "queues": ["q"], '
            '"capacity": {"cpus": 1, "memory": 1e400}}',
            "capacity",
        ),
        (json.dumps({**base, "capacity": {"cpus": 1}, "queues": ["Bad/Name"]}), "queue name"),
        (json.dumps({**base, "capacity": {"cpus": 1}, "queues": []}), "at least one queue"),
        (json.dumps({**base, "capacity": {"cpus": 1}, "held": "x"}), "held"),
        (json.dumps({**base, "capacity": 5}), "'capacity' has the wrong type"),
    ]:
        assert words in (await answer_of(raw, junk))["error"], junk
    assert "not JSON" in (await answer_of(raw, b"\x80abc", binary=True))["error"]
    await raw.send({**base, "capacity": {"cpus": 1}})
    await raw.expect("registered")
    for junk, words in [
        ({"type": "capacity", "free": {"cpus": 1, "memory": "lots"}}, "capacity"),
        ({"type": "capacity"}, "'free' is missing"),
        ({"type": "give-back", "runIds": "abc"}, "'runIds' has the wrong type"),
        (
            {"type": "result", "runId": "r", "fence": 1, "reason": "Failed", "outputs": []},
            "outputs",
        ),
        ({"type": "logs", "runId": "r", "fence": 1, "frames": "x"}, "'frames'"),
        ({"type": "logs", "runId": "r", "fence": 1, "frames": [5]}, "every frame"),
        ({"type": "phase", "runId": "r", "fence": 1, "phase": "dancing"}, "phase: one of"),
        ({"type": "phase", "runId": "r\ud800", "fence": 1, "phase": "running"}, "surrogate"),
    ]:
        await raw.send(junk)
        assert words in (await raw.expect("error"))["error"], junk
    # Still a worker: it heart-beats and is given work.
    await raw.send({"type": "capacity", "free": {"cpus": 1}})
    await raw.send({"type": "heartbeat"})
    await raw.expect("heartbeat")
    answer = body(await fetch("q", "q", method="POST", json=JOB))
    assert (await raw.expect("assign"))["runId"] == answer["runId"]


async def test_a_huge_frame_closes_that_socket_only(fetch: Fetch, jp_ws_fetch: WsFetch) -> None:
    """Frames over tornado's websocket_max_message_size (10 MiB) end the connection with 1009
    (message too big); nothing else is affected."""
    huge = "x" * (11 * 1024 * 1024)
    bystander = await watch(jp_ws_fetch)
    for path in (("q", "q", "ws"), ("worker",)):
        conn = await jp_ws_fetch("compute-queue", *path)
        peer = Peer(conn)
        if path == ("q", "q", "ws"):
            await peer.expect("snapshot")
        with contextlib.suppress(WebSocketClosedError):  # closed while it was still sending
            await conn.write_message(huge)
        closed = await asyncio.wait_for(conn.read_message(), 10)
        while closed is not None:  # anything sent before the close
            closed = await asyncio.wait_for(conn.read_message(), 10)
        assert conn.close_code == 1009, conn.close_code
    await bystander.send({"type": "ping"})
    await bystander.expect("pong")
    worker, _ = await Worker.connect(jp_ws_fetch, "after-huge")
    answer = body(await fetch("q", "q", method="POST", json=JOB))
    assert (await worker.expect("assign"))["runId"] == answer["runId"]
    assert (await bystander.expect("run", timeout=10))["run"]["runId"] == answer["runId"]
    await still_serving(fetch, jp_ws_fetch)
