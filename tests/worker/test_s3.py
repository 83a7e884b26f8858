"""A real host whose blobs live in S3 (moto's server): the blob routes' redirects, the Python
client's uploads, and a whole worker flow with inputs and outputs through S3 (Docker).

Presigned URLs point at a recording proxy in front of moto (``S3BlobStore.public_endpoint_url``),
so the tests see exactly what clients and workers send to S3, the Jupyter token included or not.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import http.server
import io
import os
import threading
import zipfile
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from jupyter_compute_queue.client.client import Client
from jupyter_compute_queue.client.http import blob_upload_headers

from ..s3_env import S3_STORE, s3_client
from .conftest import Fetch, StartWorker, body, unique_id, wait_result


def key_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Proxy(http.server.BaseHTTPRequestHandler):
    """Forwards every request to moto and records it (method, path, headers)."""

    protocol_version = "HTTP/1.1"
    target: str
    seen: list[dict[str, Any]]

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("expect", "host")}
        self.seen.append({"method": self.command, "path": self.path, "headers": headers})
        split = urlsplit(self.target)
        conn = http.client.HTTPConnection(split.hostname or "", split.port, timeout=30)
        try:
            conn.request(self.command, self.path, body=data, headers=headers)
            response = conn.getresponse()
            payload = response.read()
            self.send_response(response.status)
            for name, value in response.getheaders():
                if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
        finally:
            conn.close()

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _forward

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def s3_proxy(moto_server: str) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []
    handler = type("Handler", (Proxy,), {"target": moto_server, "seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def server_url(jp_http_port: int, jp_base_url: str, fetch: Fetch) -> str:
    """The test server's URL (``fetch`` makes it listen)."""
    return f"http://127.0.0.1:{jp_http_port}{jp_base_url}"


@pytest.fixture
def cq_config() -> dict[str, Any]:
    return {"blob_store_class": S3_STORE, "blob_grace_seconds": 120.0}


@pytest.fixture
def extra_server_config(
    s3_bucket: dict[str, Any], s3_proxy: tuple[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    return {"S3BlobStore": {**s3_bucket, "public_endpoint_url": s3_proxy[0]}}


def http_call(
    method: str, url: str, data: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, http.client.HTTPMessage, bytes]:
    split = urlsplit(url)
    conn = http.client.HTTPConnection(split.hostname or "", split.port, timeout=30)
    try:
        conn.request(method, f"{split.path}?{split.query}", body=data, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.msg, response.read()
    finally:
        conn.close()


async def test_blob_routes_redirect_to_s3(
    fetch: Fetch,
    jp_serverapp: Any,
    s3_bucket: dict[str, Any],
    s3_proxy: tuple[str, list[dict[str, Any]]],
) -> None:
    app = jp_serverapp.web_app.settings["compute_queue"]
    service = await app.ready()
    assert type(service.blobs).__name__ == "S3BlobStore"
    assert service.config.blob_grace_seconds == 120.0
    proxy, _ = s3_proxy
    data = os.urandom(200_000)
    key = key_of(data)

    r = await fetch("f", key, method="PUT", body=data)
    assert r.code == 307
    location = r.headers["Location"]
    assert location.startswith(f"{proxy}/{s3_bucket['bucket']}/blobs/{key}?")
    signed = parse_qs(urlsplit(location).query)["X-Amz-SignedHeaders"]
    assert signed == ["content-type;host;x-amz-checksum-sha256"]
    assert (await fetch("f", key, "exists")).code == 404
    status, _, _ = await asyncio.to_thread(
        http_call, "PUT", location, data, blob_upload_headers(key)
    )
    assert status == 200
    assert body(await fetch("f", key, "exists")) == {"exists": True}

    head = await fetch("f", key, method="HEAD")
    assert head.code == 200 and head.headers["Content-Length"] == str(len(data))
    assert head.headers["Content-Disposition"].startswith("attachment;")
    assert head.headers["X-Content-Type-Options"] == "nosniff"
    r = await fetch("f", key)
    assert r.code == 307
    query = parse_qs(urlsplit(r.headers["Location"]).query)
    assert query["response-content-type"] == ["application/octet-stream"]
    status, headers, got = await asyncio.to_thread(http_call, "GET", r.headers["Location"])
    assert (status, got) == (200, data)
    assert headers["Content-Disposition"].startswith(f'attachment; filename="{key}"')

    # Bytes that are not what their key says (an upload S3 did not check) are found out on
    # first reference, deleted, and refused by name.
    fake = key_of(b"what the key says")
    client = s3_client(s3_bucket["endpoint_url"])
    client.put_object(Bucket=s3_bucket["bucket"], Key=f"blobs/{fake}", Body=b"other bytes")
    client.close()
    definition = {"image": "x", "inputs": {"in.bin": {"type": "key", "value": fake}}}
    r = await fetch("q", "q", method="POST", json=definition)
    assert r.code == 400
    assert body(r)["error"] == f"inputs.in.bin: blob {fake} is not on this host; upload it first"
    assert await service.blobs.stat(fake) is None


async def test_client_upload_follows_the_redirect_without_the_token(
    server_url: str,
    host_token: str,
    jp_serverapp: Any,
    s3_proxy: tuple[str, list[dict[str, Any]]],
) -> None:
    _, seen = s3_proxy
    client = Client(server_url, host_token, queue="q")
    data = os.urandom(300 * 1024)  # over the 64 KiB inline limit: sent as a blob
    job = await asyncio.to_thread(
        client.submit, {"image": "x", "command": "true"}, files={"data.bin": data}
    )
    assert job.state == "Queued"
    key = key_of(data)
    [put] = [s for s in seen if s["method"] == "PUT"]
    assert put["path"].startswith(f"/{jp_serverapp.config['S3BlobStore']['bucket']}/blobs/{key}?")
    headers = {k.lower(): v for k, v in put["headers"].items()}
    assert "authorization" not in headers and host_token not in str(put)
    assert headers["x-amz-checksum-sha256"] == blob_upload_headers(key)["x-amz-checksum-sha256"]
    assert headers["content-type"] == "application/octet-stream"
    assert headers["content-length"] == str(len(data))
    service = await jp_serverapp.web_app.settings["compute_queue"].ready()
    assert await service.blobs.get(key) == data
    definition = await service.store.get_definition(job.job_id)
    assert definition["inputs"]["data.bin"] == {"type": "key", "value": key}

    # The host has it now: the same file again is not uploaded again.
    await asyncio.to_thread(client.upload, data)
    assert len([s for s in seen if s["method"] == "PUT"]) == 1


async def test_worker_flow_through_s3(
    fetch: Fetch,
    server_url: str,
    host_token: str,
    start_worker: StartWorker,
    s3_proxy: tuple[str, list[dict[str, Any]]],
) -> None:
    """Inputs from S3 (presigned GETs in the assignment), outputs to S3 (presigned PUTs after
    the host's 307), results served back by redirect and zipped by the host from S3."""
    _, seen = s3_proxy
    await start_worker(unique_id("s3"))
    client = Client(server_url, host_token, queue="q")
    data = os.urandom(100 * 1024)
    script = (
        "cat /inputs/data.bin > /outputs/copy.bin && "
        "sha256sum /inputs/data.bin | cut -c1-64 > /outputs/sum.txt && "
        "head -c 70000 /dev/zero > /outputs/zeros.bin"
    )
    definition = {"image": "cq-test/busybox:1", "command": ["sh", "-c", script]}
    job = await asyncio.to_thread(client.submit, definition, files={"data.bin": data})
    result = await wait_result(fetch, "q", job.job_id)
    assert result["reason"] == "Success", result
    outputs = result["outputs"]
    assert outputs["copy.bin"]["key"] == key_of(data)
    assert outputs["zeros.bin"]["key"] == key_of(b"\0" * 70000)

    gets = [s for s in seen if s["method"] == "GET" and key_of(data) in s["path"]]
    assert gets, "the worker did not fetch its input from S3"
    puts = [s for s in seen if s["method"] == "PUT"]
    put_keys = {urlsplit(s["path"]).path.rsplit("/", 1)[1] for s in puts}
    # copy.bin has the input's bytes, which S3 already holds: only the new ones go up.
    assert put_keys == {key_of(data), outputs["sum.txt"]["key"], key_of(b"\0" * 70000)}
    assert all("authorization" not in {k.lower() for k in s["headers"]} for s in seen)

    r = await fetch("q", "q", "j", job.job_id, "outputs", "sum.txt")
    assert r.code == 307
    status, headers, got = await asyncio.to_thread(http_call, "GET", r.headers["Location"])
    assert status == 200 and got.decode().strip() == key_of(data)
    assert headers["Content-Type"].startswith("text/plain")
    assert 'filename="sum.txt"' in headers["Content-Disposition"]
    r = await fetch("q", "q", "j", job.job_id, "outputs.zip")
    with zipfile.ZipFile(io.BytesIO(r.body)) as archive:
        assert archive.read("copy.bin") == data
        assert archive.read("zeros.bin") == b"\0" * 70000

    # The client reads outputs through the same redirects.
    assert await asyncio.to_thread(job.read_output, "copy.bin") == data
