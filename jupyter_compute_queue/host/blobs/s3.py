"""Blob store in S3 or an S3-compatible service, with boto3: ``s3://<bucket>/<prefix><key>``.

Uploads and downloads do not pass through the host: ``PUT f/{key}`` answers 307 to a URL
presigned with the blob's SHA-256 (S3 refuses bytes that do not match it) and ``GET f/{key}``
answers 307 to a URL presigned with the attachment headers of SPEC §7. A store that does not
check checksums (some S3-compatible services) cannot vouch for an object, so :meth:`check`
hashes such an object the first time something refers to it.

boto3 blocks: every call runs in a thread (``asyncio.to_thread``), never on the event loop.
Credentials come from boto3's usual chain (environment, ``~/.aws/``, instance roles).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import tempfile
from abc import ABCMeta
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from traitlets import Enum, Int, Unicode
from traitlets.config import LoggingConfigurable
from traitlets.traitlets import MetaHasTraits

from .base import (
    BlobError,
    BlobHashMismatch,
    BlobInfo,
    BlobNotFound,
    BlobStore,
    BlobTooLarge,
    BlobWriter,
    attachment_disposition,
    check_key,
    check_max_bytes,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["S3BlobStore"]

log = logging.getLogger(__name__)
T = TypeVar("T")

OCTET_STREAM = "application/octet-stream"
#: Bytes per read while hashing or streaming an object.
_CHUNK = 1024 * 1024
#: Objects this store has hashed (key → ETag), so each is hashed once per process.
_VERIFIED_MAX = 100_000
#: The largest object a single CopyObject (used to touch one) may copy.
_COPY_MAX = 5 * 1024**3


def checksum_sha256(key: str) -> str:
    """The ``x-amz-checksum-sha256`` value of a blob: its key (hex sha256) as base64."""
    return base64.b64encode(bytes.fromhex(check_key(key))).decode("ascii")


class _Meta(ABCMeta, MetaHasTraits):
    """Both an abstract base class's metaclass and a configurable's."""


class S3BlobStore(BlobStore, LoggingConfigurable, metaclass=_Meta):
    """Blobs as objects in an S3 bucket; configured as ``S3BlobStore.bucket`` etc."""

    bucket = Unicode("", help="The bucket (it must exist). Required.").tag(config=True)
    prefix = Unicode(
        "blobs/", help="Object names are <prefix><sha256>; one bucket can hold several hosts."
    ).tag(config=True)
    endpoint_url = Unicode(
        "", help="The S3 endpoint the host talks to (empty: AWS). E.g. http://minio:9000"
    ).tag(config=True)
    public_endpoint_url = Unicode(
        "",
        help="The endpoint that clients and workers reach, used in presigned URLs (empty: "
        "endpoint_url). Set it when the host reaches S3 by an address others cannot.",
    ).tag(config=True)
    region = Unicode("", help="The bucket's region (empty: boto3's default).").tag(config=True)
    addressing_style = Enum(
        ["auto", "path", "virtual"],
        "auto",
        help="Bucket in the path or in the host name of URLs; most S3-compatible services "
        "want 'path'.",
    ).tag(config=True)
    url_expiry = Int(
        3600,
        help="Seconds a presigned URL stays valid. Workers get theirs with an assignment and "
        "may pull or build an image first: keep it above the worker's pull/build limit.",
    ).tag(config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not self.bucket:
            raise ValueError("S3BlobStore.bucket: name the bucket that holds the blobs")
        if self.prefix and not self.prefix.endswith("/"):
            self.prefix += "/"
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise ImportError(
                "the S3 blob store needs boto3: pip install 'jupyter-compute-queue[s3]'"
            ) from None
        session = boto3.session.Session()
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": self.addressing_style},  # type: ignore[arg-type]
            retries={"mode": "standard", "max_attempts": 4},
        )
        region = self.region or None
        self._client: S3Client = session.client(
            "s3", endpoint_url=self.endpoint_url or None, region_name=region, config=config
        )
        public = self.public_endpoint_url or self.endpoint_url
        self._presigner: S3Client = (
            self._client
            if public == self.endpoint_url
            else session.client("s3", endpoint_url=public, region_name=region, config=config)
        )
        self._verified: OrderedDict[str, str] = OrderedDict()

    @classmethod
    def from_config(cls, root: Path, parent: Any) -> S3BlobStore:
        """Configured from the app's ``S3BlobStore`` section; the data dir is not used."""
        return cls(parent=parent)

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    async def _call(self, what: str, key: str | None, fn: Callable[[], T]) -> T:
        """Run a boto3 call in a thread; its failures become BlobError naming the object."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return await asyncio.to_thread(fn)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            if error.get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise BlobNotFound(f"blob {key} not found") from None
            where = f"s3://{self.bucket}/{self._name(key) if key else self.prefix}"
            raise BlobError(
                f"S3 {what} {where}: {error.get('Code')} {error.get('Message', '')}".rstrip()
            ) from exc
        except BotoCoreError as exc:
            raise BlobError(f"S3 {what} s3://{self.bucket}: {exc}") from exc

    # --- reading ------------------------------------------------------------------------------

    async def _head(self, key: str) -> dict[str, Any] | None:
        name = self._name(key)
        try:
            head = await self._call(
                "HEAD",
                key,
                lambda: self._client.head_object(
                    Bucket=self.bucket, Key=name, ChecksumMode="ENABLED"
                ),
            )
        except BlobNotFound:
            return None
        return dict(head)

    async def stat(self, key: str) -> BlobInfo | None:
        """Info from HEAD; touched_at is the object's LastModified."""
        head = await self._head(key)
        return None if head is None else _info(key, head)

    async def check(self, key: str) -> BlobInfo | None:
        """Info if the object holds the bytes its key names. An object S3 checked on upload
        (its stored SHA-256 checksum is the key) is trusted; any other is hashed here once
        (and again if its ETag changes), and deleted if it does not match."""
        head = await self._head(key)
        if head is None:
            return None
        etag = str(head.get("ETag", ""))
        if self._verified.get(key) == etag or head.get("ChecksumSHA256") == checksum_sha256(key):
            self._remember(key, etag)
            return _info(key, head)
        try:
            actual = await self._call("GET", key, lambda: self._hash_object(key))
        except BlobNotFound:
            return None
        if actual != key:
            log.warning(
                "compute-queue: s3://%s/%s holds bytes with sha256 %s: deleted",
                self.bucket,
                self._name(key),
                actual,
            )
            await self.delete(key)
            return None
        self._remember(key, etag)
        return _info(key, head)

    def _remember(self, key: str, etag: str) -> None:
        self._verified[key] = etag
        self._verified.move_to_end(key)
        while len(self._verified) > _VERIFIED_MAX:
            self._verified.popitem(last=False)

    def _hash_object(self, key: str) -> str:
        body = self._client.get_object(Bucket=self.bucket, Key=self._name(key))["Body"]
        digest = hashlib.sha256()
        try:
            while chunk := body.read(_CHUNK):
                digest.update(chunk)
        finally:
            body.close()
        return digest.hexdigest()

    def read(self, key: str, chunk_size: int = 256 * 1024) -> AsyncIterator[bytes]:
        """Stream the object; BlobNotFound comes on first iteration."""
        check_key(key)
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
        return self._read(key, chunk_size)

    async def _read(self, key: str, chunk_size: int) -> AsyncIterator[bytes]:
        name = self._name(key)
        got = await self._call(
            "GET", key, lambda: self._client.get_object(Bucket=self.bucket, Key=name)
        )
        body = got["Body"]
        try:
            while chunk := await self._call("GET", key, lambda: body.read(chunk_size)):
                yield chunk
        finally:
            body.close()

    async def list(self, touched_before: float | None = None) -> AsyncIterator[BlobInfo]:
        """Objects under the prefix, a page (up to 1,000) per call; other names are skipped."""
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix}
            if token:
                kwargs["ContinuationToken"] = token

            def page_of(kwargs: dict[str, Any] = kwargs) -> dict[str, Any]:
                return dict(self._client.list_objects_v2(**kwargs))

            page = await self._call("LIST", None, page_of)
            for obj in page.get("Contents", []):
                key = obj["Key"][len(self.prefix) :]
                if len(key) != 64 or key != key.lower() or not _is_hex(key):
                    continue
                touched = obj["LastModified"].timestamp()
                if touched_before is None or touched < touched_before:
                    yield BlobInfo(key, obj["Size"], touched)
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    # --- writing ------------------------------------------------------------------------------

    async def open_writer(self, key: str, max_bytes: int | None = None) -> BlobWriter:
        """Spool the blob to a temp file, check its hash, then upload it (for blobs the host
        itself writes; clients and workers upload to presigned URLs)."""
        check_key(key)
        check_max_bytes(max_bytes)
        return _S3Writer(self, key, max_bytes, tempfile.TemporaryFile())

    async def _upload(self, key: str, file: IO[bytes]) -> BlobInfo:
        name = self._name(key)

        def upload() -> None:
            file.seek(0)
            self._client.upload_fileobj(
                file,
                self.bucket,
                name,
                ExtraArgs={"ContentType": OCTET_STREAM, "ChecksumAlgorithm": "SHA256"},
            )

        await self._call("PUT", key, upload)
        head = await self._head(key)
        if head is None:
            raise BlobError(f"s3://{self.bucket}/{name} vanished right after its upload")
        self._remember(key, str(head.get("ETag", "")))  # hashed while it was written
        return _info(key, head)

    async def delete(self, key: str) -> bool:
        """Remove the object; True if it existed."""
        if await self._head(key) is None:
            return False
        self._verified.pop(key, None)
        name = self._name(key)
        await self._call(
            "DELETE", key, lambda: self._client.delete_object(Bucket=self.bucket, Key=name)
        )
        return True

    async def touch(self, key: str) -> None:
        """S3 cannot set LastModified: the object is copied onto itself (server-side)."""
        head = await self._head(key)
        if head is None:
            raise BlobNotFound(f"blob {key} not found")
        name = self._name(key)
        source = {"Bucket": self.bucket, "Key": name}
        extra = {"MetadataDirective": "REPLACE", "ContentType": OCTET_STREAM}
        if int(head.get("ContentLength", 0)) <= _COPY_MAX:
            await self._call(
                "COPY",
                key,
                lambda: self._client.copy_object(
                    Bucket=self.bucket,
                    Key=name,
                    CopySource=source,  # type: ignore[arg-type]
                    ChecksumAlgorithm="SHA256",
                    **extra,  # type: ignore[arg-type]
                ),
            )
        else:  # a multipart copy
            await self._call(
                "COPY",
                key,
                lambda: self._client.copy(source, self.bucket, name, ExtraArgs=extra),  # type: ignore[arg-type]
            )

    # --- URLs ---------------------------------------------------------------------------------

    async def download_url(self, key: str, filename: str, content_type: str) -> str | None:
        """A presigned GET that asks S3 for the attachment headers of SPEC §7."""
        params = {
            "Bucket": self.bucket,
            "Key": self._name(key),
            "ResponseContentDisposition": attachment_disposition(filename),
            "ResponseContentType": content_type,
        }
        return await self._call(
            "presign GET",
            key,
            lambda: self._presigner.generate_presigned_url(
                "get_object", Params=params, ExpiresIn=self.url_expiry
            ),
        )

    async def upload_url(self, key: str) -> str | None:
        """A presigned PUT signed with the blob's SHA-256 and type: the uploader sends
        ``x-amz-checksum-sha256`` (its key as base64) and ``Content-Type:
        application/octet-stream``, and S3 refuses bytes that do not match."""
        params = {
            "Bucket": self.bucket,
            "Key": self._name(key),
            "ChecksumSHA256": checksum_sha256(key),
            "ContentType": OCTET_STREAM,
        }
        return await self._call(
            "presign PUT",
            key,
            lambda: self._presigner.generate_presigned_url(
                "put_object", Params=params, ExpiresIn=self.url_expiry
            ),
        )

    async def close(self) -> None:
        """Close boto3's connection pools."""
        for client in {id(c): c for c in (self._client, self._presigner)}.values():
            await asyncio.to_thread(client.close)


class _S3Writer(BlobWriter):
    """Writes into an anonymous temp file, hashing as it goes; commit uploads it."""

    def __init__(
        self, store: S3BlobStore, key: str, max_bytes: int | None, file: IO[bytes]
    ) -> None:
        super().__init__(key, max_bytes)
        self._store = store
        self._file = file
        self._hash = hashlib.sha256()
        self._size = 0
        self._info: BlobInfo | None = None
        self._closed = False

    async def write(self, chunk: bytes) -> None:
        """Append ``chunk``; past ``max_bytes`` abort and raise BlobTooLarge."""
        if self._closed:
            raise BlobError(f"writer for blob {self.key} is closed")
        if self.max_bytes is not None and self._size + len(chunk) > self.max_bytes:
            await self.abort()
            raise BlobTooLarge(f"blob {self.key} is larger than {self.max_bytes} bytes")
        self._hash.update(chunk)
        await asyncio.to_thread(self._file.write, chunk)
        self._size += len(chunk)

    async def commit(self) -> BlobInfo:
        """Check the hash, then upload; BlobHashMismatch uploads nothing."""
        if self._info is not None:
            return self._info
        if self._closed:
            raise BlobError(f"writer for blob {self.key} is closed")
        actual = self._hash.hexdigest()
        try:
            if actual != self.key:
                raise BlobHashMismatch(self.key, actual)
            self._info = await self._store._upload(self.key, self._file)
        finally:
            await self.abort()
        return self._info

    async def abort(self) -> None:
        """Drop the temp file (idempotent)."""
        if not self._closed:
            self._closed = True
            self._file.close()


def _info(key: str, head: dict[str, Any]) -> BlobInfo:
    return BlobInfo(key, int(head.get("ContentLength", 0)), head["LastModified"].timestamp())


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)
