"""The S3 blob store against moto's S3 server (a real S3 HTTP endpoint on loopback)."""

from __future__ import annotations

import hashlib
import http.client
import os
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from traitlets.config import Config

from jupyter_compute_queue.client.http import blob_upload_headers
from jupyter_compute_queue.host.blobs import (
    BlobHashMismatch,
    BlobInfo,
    BlobNotFound,
    BlobTooLarge,
    InvalidBlobKey,
)
from jupyter_compute_queue.host.blobs.s3 import S3BlobStore, checksum_sha256

from ..s3_env import s3_client


def key_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
async def store(s3_bucket: dict[str, Any]) -> AsyncIterator[S3BlobStore]:
    blobs = S3BlobStore(config=Config({"S3BlobStore": s3_bucket}))
    yield blobs
    await blobs.close()


def raw_put(s3_bucket: dict[str, Any], key: str, data: bytes) -> None:
    """An object written behind the host's back (as an upload S3 did not check would be)."""
    client = s3_client(s3_bucket["endpoint_url"])
    client.put_object(Bucket=s3_bucket["bucket"], Key=s3_bucket["prefix"] + key, Body=data)
    client.close()


def request(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, http.client.HTTPMessage, bytes]:
    split = urlsplit(url)
    conn = http.client.HTTPConnection(split.hostname or "", split.port, timeout=10)
    try:
        conn.request(method, f"{split.path}?{split.query}", body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.msg, response.read()
    finally:
        conn.close()


def test_configuration_is_checked(aws_env: dict[str, str]) -> None:
    with pytest.raises(ValueError, match=r"S3BlobStore\.bucket"):
        S3BlobStore()
    store = S3BlobStore(config=Config({"S3BlobStore": {"bucket": "b", "prefix": "p"}}))
    assert store.prefix == "p/"


async def test_round_trip_list_touch_delete(store: S3BlobStore, s3_bucket: dict[str, Any]) -> None:
    data = os.urandom(300_000)
    key = key_of(data)
    assert await store.stat(key) is None and not await store.exists(key)
    info = await store.put(key, data)
    assert (info.key, info.size) == (key, len(data))
    assert abs(info.touched_at - time.time()) < 60
    assert await store.check(key) == info
    assert await store.get(key) == data
    assert b"".join([c async for c in store.read(key, 64 * 1024)]) == data
    with pytest.raises(BlobTooLarge):
        await store.get(key, max_bytes=1000)
    # Objects outside the prefix, or not named by a key, are none of the store's business.
    raw_put({**s3_bucket, "prefix": "other/"}, key, data)
    raw_put(s3_bucket, "not-a-key", b"x")
    listed = [i async for i in store.list()]
    assert listed == [info]
    assert [i async for i in store.list(touched_before=info.touched_at)] == []
    assert [i async for i in store.list(touched_before=info.touched_at + 1)] == [info]

    await store.touch(key)  # a copy onto itself: the bytes stay
    assert await store.get(key) == data
    assert await store.delete(key) and not await store.delete(key)
    assert await store.stat(key) is None
    with pytest.raises(BlobNotFound):
        await store.touch(key)
    with pytest.raises(BlobNotFound):
        await store.get(key)
    with pytest.raises(InvalidBlobKey):
        await store.stat("nope")


async def test_writer_refuses_wrong_bytes_and_too_many(store: S3BlobStore) -> None:
    data = b"the right bytes"
    with pytest.raises(BlobHashMismatch):
        await store.put(key_of(b"other bytes"), data)
    assert await store.stat(key_of(b"other bytes")) is None
    writer = await store.open_writer(key_of(data), max_bytes=4)
    with pytest.raises(BlobTooLarge):
        await writer.write(data)
    assert await store.stat(key_of(data)) is None


async def test_presigned_put_is_signed_with_type_and_checksum(store: S3BlobStore) -> None:
    data = os.urandom(100_000)
    key = key_of(data)
    url = await store.upload_url(key)
    assert url is not None
    query = parse_qs(urlsplit(url).query)
    assert query["X-Amz-SignedHeaders"] == ["content-type;host;x-amz-checksum-sha256"]
    assert int(query["X-Amz-Expires"][0]) == store.url_expiry
    headers = blob_upload_headers(key)
    assert headers["x-amz-checksum-sha256"] == checksum_sha256(key)
    status, _, _ = request("PUT", url, data, headers)
    assert status == 200
    assert await store.get(key) == data
    # moto keeps no checksum, so the store hashes the object on first reference.
    assert (await store.check(key)) == BlobInfo(key, len(data), (await store.stat(key)).touched_at)  # type: ignore[union-attr]


async def test_presigned_get_asks_for_the_attachment_headers(store: S3BlobStore) -> None:
    data = b"a,b\n1,2\n"
    key = key_of(data)
    await store.put(key, data)
    url = await store.download_url(key, "résumé table.csv", "text/csv; charset=utf-8")
    assert url is not None
    status, headers, body = request("GET", url)
    assert (status, body) == (200, data)
    assert headers["Content-Type"] == "text/csv; charset=utf-8"
    disposition = headers["Content-Disposition"]
    assert disposition.startswith('attachment; filename="r?sum? table.csv"')
    assert "filename*=UTF-8''r%C3%A9sum%C3%A9%20table.csv" in disposition


async def test_check_hashes_what_s3_could_not_and_deletes_a_mismatch(
    store: S3BlobStore, s3_bucket: dict[str, Any]
) -> None:
    good, bad = b"good bytes", b"not what the key says"
    raw_put(s3_bucket, key_of(good), good)
    raw_put(s3_bucket, key_of(b"claimed"), bad)
    assert await store.stat(key_of(b"claimed")) is not None  # stat does not look inside
    assert await store.check(key_of(b"claimed")) is None
    assert await store.stat(key_of(b"claimed")) is None  # deleted
    assert await store.check(key_of(good)) is not None
    # Verified once; replaced behind the store's back (a new ETag), it is hashed again.
    raw_put(s3_bucket, key_of(good), bad)
    assert await store.check(key_of(good)) is None
    assert await store.stat(key_of(good)) is None


async def test_an_object_s3_checked_is_trusted(
    store: S3BlobStore, s3_bucket: dict[str, Any]
) -> None:
    """An object whose stored SHA-256 checksum is its key is not downloaded again: S3 checked
    it (here moto computes the checksum on a copy; real S3 on a presigned upload)."""
    data = os.urandom(1000)
    key = key_of(data)
    raw_put(s3_bucket, key, data)
    await store.touch(key)  # the copy carries a SHA-256 checksum
    head = await store._head(key)
    assert head is not None and head["ChecksumSHA256"] == checksum_sha256(key)

    def no_download(key: str) -> str:
        raise AssertionError("downloaded an object S3 vouches for")

    store._hash_object = no_download  # type: ignore[method-assign]
    assert await store.check(key) is not None
