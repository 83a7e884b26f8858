"""The worker's transfers against a real Jupyter server with the extension, and against small
local servers standing in for S3, flaky hosts and servers without 100-continue."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import stat
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from tornado import web
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port

from jupyter_compute_queue.host.blobs.base import InvalidBlobKey
from jupyter_compute_queue.worker.transfer import (
    ContentCache,
    TransferError,
    Transfers,
    TransientError,
    safe_url,
)

from .conftest import Fetch, body

MiB = 1024 * 1024
Calls = list[tuple[str, str]]
StartServer = Callable[[list[Any]], str]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def host_api(http_server: Any, jp_http_port: int, jp_base_url: str) -> str:
    """The real server's compute-queue API (``http_server`` makes it listen)."""
    return f"http://127.0.0.1:{jp_http_port}{jp_base_url}compute-queue/"


@pytest.fixture
def token(jp_serverapp: Any) -> str:
    return str(jp_serverapp.identity_provider.token)


@pytest.fixture
def cache(tmp_path: Path) -> ContentCache:
    return ContentCache(tmp_path / "cache")


@pytest.fixture
def transfers(host_api: str, token: str, cache: ContentCache) -> Transfers:
    return Transfers(host_api, token, cache, backoff=0.01, timeout=10)


@pytest.fixture
def exchanges(monkeypatch: pytest.MonkeyPatch) -> Calls:
    """Every HTTP exchange the client makes (one per hop), as (method, url)."""
    calls: Calls = []
    original = Transfers._exchange

    def spy(self: Transfers, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        calls.append((method, url))
        return original(self, method, url, *args, **kwargs)

    monkeypatch.setattr(Transfers, "_exchange", spy)
    return calls


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    """Start small tornado apps on free local ports; returns their base URL (no slash)."""
    servers: list[HTTPServer] = []

    def start(handlers: list[Any]) -> str:
        sock, port = bind_unused_port()
        server = HTTPServer(web.Application(handlers))
        server.add_sockets([sock])
        servers.append(server)
        return f"http://127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop()
        await server.close_all_connections()


class Recorder:
    """What a local server saw."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    def record(self, handler: web.RequestHandler, **extra: Any) -> None:
        self.requests.append(
            {
                "method": handler.request.method,
                "path": handler.request.path,
                "auth": handler.request.headers.get("Authorization"),
                "expect": handler.request.headers.get("Expect"),
                **extra,
            }
        )

    def of(self, method: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == method]


class Missing(web.RequestHandler):
    """``f/{key}/exists`` of a host that has nothing."""

    def get(self, key: str) -> None:
        self.set_status(404)
        self.finish({"error": "no blob"})


# --- the content cache -----------------------------------------------------------------------


def test_cache_layout_and_keys(cache: ContentCache, tmp_path: Path) -> None:
    key = sha(b"x")
    assert cache.path(key) == cache.root / key[:2] / key
    for bad in ("abc", key.upper(), key + "\n", "../" + key[3:]):
        with pytest.raises(InvalidBlobKey):
            cache.path(bad)
    src = tmp_path / "src"
    src.write_bytes(b"x")
    assert not cache.has(key)
    assert cache.add_file(src) == key  # hashes the file itself
    assert cache.has(key) and not src.exists()
    assert not stat.S_IMODE(cache.path(key).stat().st_mode) & 0o222  # read-only
    again = tmp_path / "again"
    again.write_bytes(b"x")
    assert cache.add_file(again) == key and not again.exists()  # already there: dropped


def test_link_into_links_or_copies(
    cache: ContentCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"data")
    key = cache.add_file(src)
    dest = tmp_path / "run" / "inputs" / "deep" / "file.txt"
    cache.link_into(key, dest)
    assert dest.read_bytes() == b"data"
    assert dest.stat().st_ino == cache.path(key).stat().st_ino
    cache.link_into(key, dest)  # replaces what is there
    assert dest.read_bytes() == b"data"

    def no_link(*args: Any) -> None:
        raise OSError(errno.EXDEV, "cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    other = tmp_path / "elsewhere" / "file.txt"
    cache.link_into(key, other)
    assert other.read_bytes() == b"data"
    assert other.stat().st_ino != cache.path(key).stat().st_ino
    assert stat.S_IMODE(other.stat().st_mode) & 0o200  # a copy is the run's own, writable
    with pytest.raises(FileNotFoundError):
        cache.link_into(sha(b"absent"), tmp_path / "nothing")


def test_safe_url_drops_secrets() -> None:
    url = "https://user:pw@s3.example:9000/bucket/key?X-Amz-Signature=secret#frag"
    assert safe_url(url) == "https://s3.example:9000/bucket/key"


def test_arguments_are_checked(cache: ContentCache) -> None:
    with pytest.raises(ValueError, match="end with"):
        Transfers("http://h/compute-queue", None, cache)
    with pytest.raises(ValueError, match="retries"):
        Transfers("http://h/compute-queue/", None, cache, retries=0)


async def test_only_http_urls(cache: ContentCache, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("worker's own file")
    transfers = Transfers("http://127.0.0.1:9/api/", None, cache)
    with pytest.raises(TransferError, match="only absolute http and https"):
        await transfers.fetch(secret.as_uri(), tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


# --- against the real host -------------------------------------------------------------------


async def test_upload_then_skip(
    transfers: Transfers, exchanges: Calls, fetch: Fetch, tmp_path: Path
) -> None:
    data = os.urandom(300_000)
    path = tmp_path / "out.bin"
    path.write_bytes(data)
    assert await transfers.upload(path) == (sha(data), len(data))
    blob = transfers.blob_url(sha(data))
    assert exchanges == [("GET", blob + "/exists"), ("PUT", blob)]
    stored = await fetch("f", sha(data))
    assert stored.code == 200 and stored.body == data

    exchanges.clear()
    assert await transfers.upload(path) == (sha(data), len(data))
    assert exchanges == [("GET", blob + "/exists")]  # the host has it: no PUT


async def test_upload_needs_the_token(
    host_api: str, cache: ContentCache, exchanges: Calls, tmp_path: Path
) -> None:
    path = tmp_path / "out.bin"
    path.write_bytes(b"hello")
    anonymous = Transfers(host_api, None, cache, backoff=0.01)
    with pytest.raises(TransferError, match="401") as info:
        await anonymous.upload(path)
    assert not isinstance(info.value, TransientError)
    assert len(exchanges) == 1  # refused at the existence check, not retried


async def test_fetch_host_blob_then_from_cache(
    transfers: Transfers, cache: ContentCache, exchanges: Calls, fetch: Fetch, tmp_path: Path
) -> None:
    data = b"input bytes " * 1000
    key = sha(data)
    put = await fetch("f", key, method="PUT", body=data)
    assert put.code == 201 and body(put) == {"key": key, "size": len(data)}

    dest = tmp_path / "run1" / "inputs" / "a.txt"
    assert await transfers.fetch(transfers.blob_url(key), dest, sha256=key) == key
    assert dest.read_bytes() == data
    assert dest.stat().st_ino == cache.path(key).stat().st_ino  # linked from the cache
    assert len(exchanges) == 1

    exchanges.clear()
    dest2 = tmp_path / "run2" / "inputs" / "a.txt"
    assert await transfers.fetch(f"f/{key}", dest2, sha256=key) == key  # relative to the API
    assert dest2.read_bytes() == data
    assert exchanges == []  # served from the cache
    assert list(cache.tmp_dir.iterdir()) == []


async def test_fetch_without_hash_caches_by_content(
    transfers: Transfers, cache: ContentCache, fetch: Fetch, tmp_path: Path
) -> None:
    data = b"some url input"
    await fetch("f", sha(data), method="PUT", body=data)
    dest = tmp_path / "in.txt"
    assert await transfers.fetch(transfers.blob_url(sha(data)), dest) == sha(data)
    assert cache.has(sha(data)) and dest.read_bytes() == data


async def test_fetch_hash_mismatch_caches_nothing(
    transfers: Transfers, cache: ContentCache, exchanges: Calls, fetch: Fetch, tmp_path: Path
) -> None:
    data = b"the real bytes"
    await fetch("f", sha(data), method="PUT", body=data)
    wrong = sha(b"what the definition claims")
    dest = tmp_path / "in.txt"
    with pytest.raises(TransferError, match=f"expected sha256 {wrong}") as info:
        await transfers.fetch(transfers.blob_url(sha(data)), dest, sha256=wrong)
    assert not isinstance(info.value, TransientError)
    assert len(exchanges) == 1
    assert not cache.has(wrong) and not cache.has(sha(data))
    assert list(cache.tmp_dir.iterdir()) == [] and not dest.exists()


async def test_fetch_404_is_not_retried(
    transfers: Transfers, exchanges: Calls, tmp_path: Path
) -> None:
    absent = sha(b"nobody uploaded this")
    with pytest.raises(TransferError, match=f"answered 404: no blob {absent}") as info:
        await transfers.fetch(transfers.blob_url(absent), tmp_path / "x")
    assert not isinstance(info.value, TransientError)
    assert len(exchanges) == 1


@pytest.mark.parametrize("cq_config", [{"max_blob_bytes": 100_000}])
async def test_upload_over_the_limit_is_413_before_the_body(
    transfers: Transfers, exchanges: Calls, tmp_path: Path
) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(4 * MiB))
    started = time.monotonic()
    with pytest.raises(TransferError, match="answered 413") as info:
        await transfers.upload(path)
    assert not isinstance(info.value, TransientError)
    assert [m for m, _ in exchanges] == ["GET", "PUT"]
    # Answered at 100-continue time: no wait for the fallback, no body pushed first.
    assert time.monotonic() - started < transfers.continue_wait


async def test_real_host_redirects_upload_to_s3_without_token(
    transfers: Transfers,
    jp_serverapp: Any,
    start_server: StartServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The host's S3 store answers PUT f/{key} with 307 in ``prepare``; the body goes to S3
    only, and the Jupyter token stays home."""
    s3 = Recorder()

    class Bucket(web.RequestHandler):
        def put(self, key: str) -> None:
            s3.record(self, sha=sha(self.request.body), query=self.request.query)
            self.set_status(200)

    s3_url = start_server([(r"/bucket/(\w+)", Bucket)])
    service = await jp_serverapp.web_app.settings["compute_queue"].ready()

    async def upload_url(key: str) -> str:
        return f"{s3_url}/bucket/{key}?X-Amz-Signature=secret"

    monkeypatch.setattr(service.blobs, "upload_url", upload_url)
    data = os.urandom(3 * MiB)
    path = tmp_path / "out.bin"
    path.write_bytes(data)
    assert await transfers.upload(path) == (sha(data), len(data))
    [put] = s3.of("PUT")
    assert put["sha"] == sha(data) and put["query"] == "X-Amz-Signature=secret"
    assert put["auth"] is None and put["path"] == f"/bucket/{sha(data)}"


async def test_redirect_off_host_drops_token_and_body_is_sent_once(
    cache: ContentCache, start_server: StartServer, tmp_path: Path
) -> None:
    seen = Recorder()
    received = {"host": 0}

    class Bucket(web.RequestHandler):
        def put(self, key: str) -> None:
            seen.record(self, where="s3", size=len(self.request.body))
            self.set_status(403)  # and an error, to check the message has no signature
            self.finish("<Error>SignatureDoesNotMatch</Error>")

    s3_url = start_server([(r"/bucket/(\w+)", Bucket)])

    @web.stream_request_body
    class Blob(web.RequestHandler):
        def prepare(self) -> None:
            seen.record(self, where="host")
            # Like the host's BlobHandler: decide before reading a byte of the body.
            self.redirect(f"{s3_url}/bucket/{self.path_kwargs['key']}?sig=secret", status=307)

        def data_received(self, chunk: bytes) -> None:
            received["host"] += len(chunk)

        def put(self, key: str) -> None:
            pass

    host = start_server([(r"/api/f/(?P<key>\w+)/exists", Missing), (r"/api/f/(?P<key>\w+)", Blob)])
    transfers = Transfers(f"{host}/api/", "tok", cache, retries=2, backoff=0.01)
    path = tmp_path / "out.bin"
    path.write_bytes(os.urandom(8 * MiB))
    with pytest.raises(TransferError, match="answered 403") as info:
        await transfers.upload(path)
    assert "secret" not in str(info.value) and "SignatureDoesNotMatch" in str(info.value)
    host_put, s3_put = seen.of("PUT")
    assert host_put["where"] == "host" and host_put["auth"] == "token tok"
    assert host_put["expect"] == "100-continue"
    assert s3_put["where"] == "s3" and s3_put["auth"] is None
    assert s3_put["size"] == 8 * MiB
    assert received["host"] == 0  # the host never had to swallow the file


async def test_same_host_redirect_keeps_token(
    cache: ContentCache, start_server: StartServer, tmp_path: Path
) -> None:
    seen = Recorder()

    class Blob(web.RequestHandler):
        def put(self, key: str) -> None:
            seen.record(self)
            self.redirect(f"moved/{key}", status=307)  # relative: same host, under the API

    class Moved(web.RequestHandler):
        def put(self, key: str) -> None:
            seen.record(self, sha=sha(self.request.body))
            self.redirect(f"/outside/{key}", status=307)  # same origin, not the API

    class Outside(web.RequestHandler):
        def put(self, key: str) -> None:
            seen.record(self, sha=sha(self.request.body))
            self.set_status(201)

    host = start_server(
        [
            (r"/api/f/(\w+)/exists", Missing),
            (r"/api/f/(\w+)", Blob),
            (r"/api/f/moved/(\w+)", Moved),
            (r"/outside/(\w+)", Outside),
        ]
    )
    transfers = Transfers(f"{host}/api/", "tok", cache)
    data = b"x" * 100_000
    path = tmp_path / "out.bin"
    path.write_bytes(data)
    await transfers.upload(path)
    first, moved, outside = seen.of("PUT")
    assert first["auth"] == moved["auth"] == "token tok"
    assert moved["path"] == f"/api/f/moved/{sha(data)}" and moved["sha"] == sha(data)
    assert outside["auth"] is None and outside["sha"] == sha(data)


async def test_fetch_redirect_chain_never_regains_token(
    cache: ContentCache, start_server: StartServer, tmp_path: Path
) -> None:
    seen = Recorder()
    data = b"presigned download"
    urls: dict[str, str] = {}

    class Blob(web.RequestHandler):
        def get(self, key: str) -> None:
            seen.record(self, where="host")
            self.redirect(f"{urls['s3']}/bucket/{key}", status=307)

    class Back(web.RequestHandler):
        def get(self, key: str) -> None:
            seen.record(self, where="host-again")
            self.finish(data)

    class Bucket(web.RequestHandler):
        def get(self, key: str) -> None:
            seen.record(self, where="s3")
            self.redirect(f"{urls['host']}/api/again/{key}", status=302)

    urls["s3"] = start_server([(r"/bucket/(\w+)", Bucket)])
    urls["host"] = start_server([(r"/api/f/(\w+)", Blob), (r"/api/again/(\w+)", Back)])
    transfers = Transfers(f"{urls['host']}/api/", "tok", cache)
    key = await transfers.fetch(transfers.blob_url(sha(data)), tmp_path / "in", sha(data))
    assert key == sha(data) and (tmp_path / "in").read_bytes() == data
    assert [(r["where"], r["auth"]) for r in seen.requests] == [
        ("host", "token tok"),
        ("s3", None),
        ("host-again", None),
    ]


# --- transient errors ------------------------------------------------------------------------


def flaky_host(
    start_server: StartServer, failures: int, status: int = 503
) -> tuple[str, list[int]]:
    """A host whose PUT fails ``failures`` times with ``status``, then stores."""
    attempts: list[int] = []

    class Blob(web.RequestHandler):
        def put(self, key: str) -> None:
            attempts.append(len(self.request.body))
            if len(attempts) <= failures:
                self.set_status(status)
                self.finish({"error": "busy"})
                return
            assert sha(self.request.body) == key
            self.set_status(201)
            self.finish({"key": key, "size": len(self.request.body)})

    host = start_server([(r"/api/f/(\w+)/exists", Missing), (r"/api/f/(\w+)", Blob)])
    return f"{host}/api/", attempts


async def test_transient_failures_are_retried_with_backoff(
    cache: ContentCache, start_server: StartServer, tmp_path: Path
) -> None:
    api, attempts = flaky_host(start_server, failures=2)
    transfers = Transfers(api, None, cache, retries=4, backoff=0.1)
    path = tmp_path / "out.bin"
    path.write_bytes(b"payload" * 1000)
    started = time.monotonic()
    assert await transfers.upload(path) == (sha(path.read_bytes()), 7000)
    assert attempts == [7000, 7000, 7000]
    assert time.monotonic() - started >= 0.1 + 0.2  # backoff * 2**0, then * 2**1


@pytest.mark.parametrize("status", [503, 429])
async def test_always_failing_gives_up_after_retries(
    cache: ContentCache, start_server: StartServer, tmp_path: Path, status: int
) -> None:
    api, attempts = flaky_host(start_server, failures=1000, status=status)
    transfers = Transfers(api, None, cache, retries=3, backoff=0.01)
    path = tmp_path / "out.bin"
    path.write_bytes(b"payload")
    with pytest.raises(TransientError, match=f"answered {status}: busy.*after 3 attempts"):
        await transfers.upload(path)
    assert len(attempts) == 3


async def test_client_errors_are_not_retried(
    cache: ContentCache, start_server: StartServer, tmp_path: Path
) -> None:
    api, attempts = flaky_host(start_server, failures=1000, status=403)
    transfers = Transfers(api, None, cache, retries=3, backoff=0.01)
    path = tmp_path / "out.bin"
    path.write_bytes(b"payload")
    with pytest.raises(TransferError, match="answered 403") as info:
        await transfers.upload(path)
    assert not isinstance(info.value, TransientError)
    assert len(attempts) == 1


async def test_connection_refused_is_transient(
    cache: ContentCache, exchanges: Calls, tmp_path: Path
) -> None:
    sock, port = bind_unused_port()
    sock.close()  # nothing listens there now
    transfers = Transfers(f"http://127.0.0.1:{port}/api/", None, cache, retries=2, backoff=0.01)
    with pytest.raises(TransientError, match="after 2 attempts"):
        await transfers.fetch(f"f/{sha(b'x')}", tmp_path / "x")
    assert len(exchanges) == 2
    assert list(cache.tmp_dir.iterdir()) == []


async def test_server_without_100_continue(cache: ContentCache, tmp_path: Path) -> None:
    """A server that ignores ``Expect`` gets the body after ``continue_wait``."""
    CLOSE = b"Connection: close\r\n"
    bodies: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        lines = head.split("\r\n")
        headers = dict(
            (name.strip().lower(), value.strip())
            for name, _, value in (line.partition(":") for line in lines[1:] if line)
        )
        if lines[0].startswith("GET"):
            writer.write(b"HTTP/1.1 404 Not Found\r\n" + CLOSE + b"Content-Length: 0\r\n\r\n")
        else:
            bodies.append(await reader.readexactly(int(headers["content-length"])))
            writer.write(b"HTTP/1.1 201 Created\r\n" + CLOSE + b"Content-Length: 2\r\n\r\n{}")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        transfers = Transfers(f"http://127.0.0.1:{port}/api/", None, cache)
        transfers.continue_wait = 0.3
        path = tmp_path / "out.bin"
        path.write_bytes(b"z" * 500_000)
        started = time.monotonic()
        await transfers.upload(path)
        assert time.monotonic() - started >= 0.3
        assert bodies == [b"z" * 500_000]
    finally:
        server.close()
        await server.wait_closed()


async def test_cancelled_fetch_stops_and_cleans_up(
    cache: ContentCache, start_server: StartServer, tmp_path: Path
) -> None:
    streaming = asyncio.Event()
    closed = asyncio.Event()

    class Endless(web.RequestHandler):
        async def get(self, key: str) -> None:
            sent = 0
            try:
                while True:
                    self.write(b"y" * 65536)
                    await self.flush()
                    sent += 65536
                    if sent >= MiB:
                        streaming.set()
                    await asyncio.sleep(0.01)
            except Exception:
                closed.set()

    host = start_server([(r"/api/f/(\w+)", Endless)])
    transfers = Transfers(f"{host}/api/", None, cache)
    task = asyncio.ensure_future(transfers.fetch(f"f/{sha(b'x')}", tmp_path / "x"))
    await asyncio.wait_for(streaming.wait(), 10)
    assert len(list(cache.tmp_dir.iterdir())) == 1  # the download in progress
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(closed.wait(), 5)  # the thread noticed and hung up
    for _ in range(100):  # it removes its temp file right after
        if not list(cache.tmp_dir.iterdir()):
            break
        await asyncio.sleep(0.02)
    assert list(cache.tmp_dir.iterdir()) == []


# --- bounded memory --------------------------------------------------------------------------


async def test_large_file_streams_with_bounded_memory(
    transfers: Transfers, host_api: str, token: str, tmp_path: Path
) -> None:
    size = 50 * MiB
    path = tmp_path / "large.bin"
    digest = hashlib.sha256()
    with path.open("wb") as file:
        for _ in range(size // MiB):
            block = os.urandom(MiB)
            digest.update(block)
            file.write(block)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        assert await transfers.upload(path) == (digest.hexdigest(), size)
        upload_peak = tracemalloc.get_traced_memory()[1]
        # Back down, into another cache.
        other = Transfers(host_api, token, ContentCache(tmp_path / "cache2"))
        tracemalloc.reset_peak()
        dest = tmp_path / "fetched.bin"
        assert await other.fetch(other.blob_url(digest.hexdigest()), dest) == digest.hexdigest()
        fetch_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert dest.stat().st_size == size
    print(f"peak traced memory: upload {upload_peak / MiB:.2f}, fetch {fetch_peak / MiB:.2f} MiB")
    # Both the client and the (in-process) server count here; chunks are 256 KiB.
    assert upload_peak < 8 * MiB
    assert fetch_peak < 8 * MiB
