"""How a worker moves bytes: inputs into its content cache, outputs up to the host (SPEC §6, §7).

Every transfer runs ``http.client`` in a thread (``asyncio.to_thread``), chosen over tornado's
async client because:

* the whole pipeline is blocking work that must stay off the event loop anyway: reading and
  writing files, hashing (about a second per GiB), fsync. Tornado's ``streaming_callback`` is
  synchronous, so downloads would write and hash on the loop;
* uploads need ``Expect: 100-continue`` with a fallback for servers that never answer it.
  The host's ``PUT f/{key}`` decides before reading the body: a 307 to a presigned S3 URL (or a
  401/413) is answered at once and the connection closed. Without the handshake the client
  would push the whole file at a host that discards it, and usually fail with a broken pipe
  before seeing the redirect. Tornado's client waits for the ``100`` until its request timeout;
  here we wait ``continue_wait`` seconds and then send anyway, as RFC 9110 §10.1.1 suggests;
* redirects must be followed by hand (to drop the token when they leave the host) and only
  ``http``/``https`` may be fetched (``urllib`` would also open ``file:`` URLs of the worker).

Requests do not go through ``HTTP(S)_PROXY``: the worker's websocket to the host does not
either. A URL a job gave connects only where ``policy`` allows (``fetch_policy.py``).
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import logging
import os
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO, TypeVar
from urllib.parse import SplitResult, urljoin, urlsplit

from ..client.http import DEFAULT_PORTS, REDIRECTS, Replay, Reply, blob_upload_headers, under_api
from ..model.blob_keys import check_key
from .content_cache import Cancelled, ContentCache, hash_file
from .fetch_policy import FetchPolicy, FetchRefused, from_blob_store, open_connection

__all__ = ["ContentCache", "TransferError", "Transfers", "TransientError", "safe_url"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Bytes per read and write: large enough that per-call overhead is noise, small enough that
#: memory stays flat whatever the file size.
CHUNK = 256 * 1024
#: Hops followed before giving up (a loop, or a misconfigured proxy).
MAX_REDIRECTS = 10
#: How long an upload waits for ``100 Continue`` before sending the body anyway.
CONTINUE_WAIT = 1.0
#: At most this much of an error response is read for the message.
_ERROR_BODY_MAX = 4096
#: At most this much of an early response head is read byte by byte.
_HEAD_MAX = 64 * 1024


class TransferError(Exception):
    """A transfer failed; the message names the URL (without secrets) and the status."""


class TransientError(TransferError):
    """A failure worth retrying: connection errors, timeouts, 5xx and 429 answers."""


def safe_url(url: str) -> str:
    """``url`` without user info, query or fragment: presigned URLs carry their signature in
    the query, and some people put passwords in the authority."""
    try:
        split = urlsplit(url)
        host = split.hostname or ""
        port = split.port
    except ValueError:
        return "<unparsable URL>"
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    return f"{split.scheme}://{netloc}{split.path}"


def _parse(url: str) -> SplitResult:
    """Split an absolute http(s) URL, refusing anything else (``file:``, ``ftp:``, relative)."""
    split = urlsplit(url)
    if split.scheme not in DEFAULT_PORTS or not split.hostname:
        raise TransferError(f"{safe_url(url)}: only absolute http and https URLs can be fetched")
    try:
        split.port  # noqa: B018 - validates the port
    except ValueError as exc:
        raise TransferError(f"{safe_url(url)}: {exc}") from None
    return split


class _Upload:
    """The body of a PUT: the first ``size`` bytes of an open file, streamed in chunks (from
    the start again on every hop of a redirect)."""

    def __init__(self, path: Path, file: BinaryIO, size: int) -> None:
        self.path = path
        self.file = file
        self.size = size

    def chunks(self, cancel: threading.Event) -> Iterator[bytes]:
        """The bytes to send. A local read failure is a TransferError, not an OSError, so it
        is never mistaken for a network failure (and retried)."""
        try:
            self.file.seek(0)
            remaining = self.size
            while remaining > 0:
                if cancel.is_set():
                    raise Cancelled
                chunk = self.file.read(min(CHUNK, remaining))
                if not chunk:
                    raise TransferError(f"{self.path} shrank while it was being uploaded")
                remaining -= len(chunk)
                yield chunk
        except OSError as exc:
            raise TransferError(f"reading {self.path}: {_describe(exc)}") from exc


class Transfers:
    """Downloads into a :class:`ContentCache` and uploads to the host's blob store.

    ``host_api`` is the host's compute-queue API URL ending in ``/`` (for example
    ``http://h:8888/base/compute-queue/``). The token is sent only to URLs under it (same
    scheme, host and port, and under its path): an input URL elsewhere on the host, such as
    the Jupyter contents API, never gets the owner's credentials. Once a redirect chain has
    left the host it does not get the token back either.

    Each operation is tried ``retries`` times in all, sleeping ``backoff * 2**i`` seconds after
    the i-th transient failure; other failures are raised at once.
    ``policy``: where a download without ``sha256`` (a job's URL) may connect (None: anywhere).
    """

    #: Seconds an upload waits for ``100 Continue`` before sending the body regardless.
    continue_wait = CONTINUE_WAIT

    def __init__(
        self,
        host_api: str,
        token: str | None,
        cache: ContentCache,
        retries: int = 4,
        backoff: float = 0.5,
        timeout: float = 60.0,
        policy: FetchPolicy | None = None,
    ) -> None:
        if not host_api.endswith("/"):
            raise ValueError(f"host_api must end with '/': {safe_url(host_api)}")
        if retries < 1:
            raise ValueError(f"retries must be at least 1, got {retries}")
        self.host_api = host_api
        self._api = _parse(host_api)
        self.token = token
        self.cache = cache
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        self.policy = policy
        self._ssl = ssl.create_default_context()

    # --- public API ---------------------------------------------------------------------------

    def blob_url(self, sha256: str) -> str:
        """The host's ``f/{key}`` URL of a blob."""
        return f"{self.host_api}f/{check_key(sha256)}"

    async def fetch(
        self, url: str, dest: Path, sha256: str | None = None, *, copy: bool = False
    ) -> str:
        """Download ``url`` (absolute, or relative to ``host_api``) into the cache and put it
        at ``dest`` (:meth:`ContentCache.link_into`: a hard link, or with ``copy`` a file of
        its own, as a run's writable inputs need); return its sha256.

        With ``sha256`` a cached copy is used without a request, and the download is checked
        against it (a mismatch raises TransferError and caches nothing). Without it (a job's
        ``url`` input) every hop goes through :attr:`policy` (FetchRefused, not retried); with
        it the URL is the host's, and the bytes are pinned to a blob the host already has.
        """
        absolute = urljoin(self.host_api, url)
        _parse(absolute)
        if sha256 is not None:
            check_key(sha256)
            if await asyncio.to_thread(self.cache.has, sha256):
                try:
                    await asyncio.to_thread(self.cache.link_into, sha256, dest, copy=copy)
                    return sha256
                except FileNotFoundError:
                    pass  # pruned since has(): fetched again below
        policy = self.policy if sha256 is None else None
        try:
            key = await self._retry(lambda cancel: self._download(absolute, sha256, cancel, policy))
        except FetchRefused as exc:
            exc.requested = url
            raise
        await asyncio.to_thread(self.cache.link_into, key, dest, copy=copy)
        return key

    async def upload(self, path: Path) -> tuple[str, int]:
        """Put a local file in the host's blob store; return its (sha256, size).

        Asks ``GET f/{key}/exists`` first and skips the upload if the host has the blob.
        """
        key, size = await self._in_thread(lambda cancel: hash_file(path, cancel))
        if await self._retry(lambda cancel: self._exists(key, cancel)):
            return key, size
        await self._retry(lambda cancel: self._put(path, key, size, cancel))
        return key, size

    # --- retries and threads ------------------------------------------------------------------

    async def _in_thread(self, fn: Callable[[threading.Event], T]) -> T:
        """Run ``fn`` in a thread; if the awaiting task is cancelled, tell ``fn`` to stop at
        its next chunk (a thread cannot be interrupted) so it cleans up soon."""
        cancel = threading.Event()
        try:
            return await asyncio.to_thread(fn, cancel)
        except asyncio.CancelledError:
            cancel.set()
            raise

    async def _retry(self, fn: Callable[[threading.Event], T]) -> T:
        """Run ``fn`` in a thread up to ``retries`` times while it fails transiently."""
        for attempt in range(self.retries):
            try:
                return await self._in_thread(fn)
            except TransientError as exc:
                if attempt + 1 >= self.retries:
                    raise TransientError(f"{exc} (gave up after {self.retries} attempts)") from exc
                delay = self.backoff * 2**attempt
                log.warning(
                    "%s; retrying in %.1f s (attempt %d of %d)",
                    exc,
                    delay,
                    attempt + 2,
                    self.retries,
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable: retries >= 1")

    # --- operations (in a thread) -------------------------------------------------------------

    def _exists(self, key: str, cancel: threading.Event) -> bool:
        url = f"{self.blob_url(key)}/exists"
        with self._request("GET", url, {}, None, cancel) as response:
            if response.status == 404:
                return False
            self._check("GET", response)
            return True

    def _put(self, path: Path, key: str, size: int, cancel: threading.Event) -> None:
        headers = {**blob_upload_headers(key), "Content-Length": str(size)}
        with path.open("rb") as file:
            body = _Upload(path, file, size)
            with self._request("PUT", self.blob_url(key), headers, body, cancel) as response:
                self._check("PUT", response)

    def _download(
        self, url: str, sha256: str | None, cancel: threading.Event, policy: FetchPolicy | None
    ) -> str:
        fd, name = tempfile.mkstemp(dir=self.cache.tmp_dir, prefix="fetch-", suffix=".part")
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                digest = hashlib.sha256()
                total = 0
                with self._request("GET", url, {}, None, cancel, policy) as response:
                    self._check("GET", response)
                    where = f"GET {safe_url(response.url)}"
                    while True:
                        if cancel.is_set():
                            raise Cancelled
                        try:
                            chunk = response.read(CHUNK)
                        except (OSError, http.client.HTTPException) as exc:
                            raise TransientError(f"{where}: {_describe(exc)}") from exc
                        if not chunk:
                            break
                        digest.update(chunk)
                        out.write(chunk)
                        total += len(chunk)
                    length = response.header("Content-Length")
                    if length is not None and length.isdigit() and int(length) != total:
                        # http.client reports an early close as a short read, not an error.
                        raise TransientError(f"{where}: got {total} of {length} bytes")
                # Durable before it is renamed into the cache: after a crash a cached file
                # must hold its bytes, since nothing checks them again.
                out.flush()
                os.fsync(out.fileno())
            key = digest.hexdigest()
            if sha256 is not None and key != sha256:
                raise TransferError(
                    f"GET {safe_url(url)}: expected sha256 {sha256}, got {key} ({total} bytes)"
                )
            self.cache.add_file(tmp, sha256=key)
            return key
        finally:
            tmp.unlink(missing_ok=True)

    # --- HTTP -------------------------------------------------------------------------------

    def _on_host(self, split: SplitResult) -> bool:
        return under_api(split, self._api)

    def _request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: _Upload | None,
        cancel: threading.Event,
        policy: FetchPolicy | None = None,
    ) -> Reply:
        """Send a request and follow redirects; the caller closes the response. Each hop goes
        through ``policy``, except one the host's blob routes redirected to (its store)."""
        trusted = True  # the chain has not left the host's API yet
        hop_policy = policy
        for _hop in range(MAX_REDIRECTS + 1):
            split = _parse(url)
            trusted = trusted and self._on_host(split)
            hop_headers = dict(headers)
            if trusted and self.token:
                hop_headers["Authorization"] = f"token {self.token}"
            response = self._exchange(method, url, split, hop_headers, body, cancel, hop_policy)
            if response.status not in REDIRECTS:
                return response
            with response:
                location = response.header("Location")
            if not location:
                raise TransferError(
                    f"{method} {safe_url(url)} answered {response.status} without a Location"
                )
            if body is not None and response.status not in (307, 308):
                # 301/302/303 turn the request into a GET: the upload would silently vanish.
                raise TransferError(
                    f"{method} {safe_url(url)} answered {response.status}, which drops the body"
                )
            hop_policy = None if from_blob_store(split, self._api) else policy
            url = urljoin(url, location)
        raise TransferError(f"{method} {safe_url(url)}: more than {MAX_REDIRECTS} redirects")

    def _exchange(
        self,
        method: str,
        url: str,
        split: SplitResult,
        headers: Mapping[str, str],
        body: _Upload | None,
        cancel: threading.Event,
        policy: FetchPolicy | None = None,
    ) -> Reply:
        """One request and the head of its response, errors classified."""
        where = f"{method} {safe_url(url)}"
        conn = open_connection(policy, url, self.timeout, self._ssl)
        try:
            target = split.path or "/"
            if split.query:
                target += "?" + split.query
            conn.putrequest(method, target, skip_host=True)
            conn.putheader("Host", split.netloc.rpartition("@")[2])
            for name, value in headers.items():
                conn.putheader(name, value)
            expect = body is not None and body.size > 0
            if expect:
                conn.putheader("Expect", "100-continue")
            conn.endheaders()
            if body is not None:
                early = self._wait_for_continue(conn) if expect else None
                if early is not None:
                    # Answered before the body (a redirect, 401, 413 …): parse that answer.
                    response = http.client.HTTPResponse(
                        Replay(early, conn.sock),  # type: ignore[arg-type]
                        method=method,
                    )
                    response.begin()
                    return Reply(url, conn, response)
                try:
                    self._send_body(conn, body, cancel)
                except OSError as exc:
                    # The server may have answered and closed mid-body (e.g. 413): that
                    # answer says more than the broken pipe.
                    try:
                        return Reply(url, conn, conn.getresponse())
                    except (OSError, http.client.HTTPException):
                        raise TransientError(f"{where}: {_describe(exc)}") from exc
            return Reply(url, conn, conn.getresponse())
        except ssl.SSLCertVerificationError as exc:
            conn.close()
            raise TransferError(f"{where}: {_describe(exc)}") from exc
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise TransientError(f"{where}: {_describe(exc)}") from exc
        except BaseException:
            conn.close()
            raise

    def _wait_for_continue(self, conn: http.client.HTTPConnection) -> bytes | None:
        """Wait up to ``continue_wait`` for the server's answer to ``Expect: 100-continue``.

        None: send the body (``100 Continue``, or silence). Bytes: the head of a final
        response the server sent instead.
        """
        sock = conn.sock
        assert sock is not None
        while True:
            sock.settimeout(self.continue_wait)
            try:
                first = sock.recv(1)
            except TimeoutError:
                return None  # the server does not do 100-continue: send the body
            finally:
                sock.settimeout(self.timeout)
            if not first:
                raise ConnectionError("connection closed before the server answered")
            head = bytearray(first)
            # Byte by byte: nothing past the head may be consumed, it belongs to the body.
            while not head.endswith(b"\r\n\r\n"):
                byte = sock.recv(1)
                if not byte:
                    raise ConnectionError("connection closed inside a response head")
                head += byte
                if len(head) > _HEAD_MAX:
                    raise http.client.HTTPException("response head too long")
            status = head.split(b" ", 2)[1:2]
            if not (status and status[0].startswith(b"1") and len(status[0]) == 3):
                return bytes(head)
            if status[0] == b"100":
                return None
            # Another 1xx (103 Early Hints): informational, wait for the real answer.

    def _send_body(
        self, conn: http.client.HTTPConnection, body: _Upload, cancel: threading.Event
    ) -> None:
        for chunk in body.chunks(cancel):
            conn.send(chunk)

    def _check(self, method: str, response: Reply) -> None:
        """Return on 2xx; otherwise raise TransientError (429, 5xx) or TransferError."""
        status = response.status
        if 200 <= status < 300:
            return
        message = response.error_text(_ERROR_BODY_MAX)[:300]
        text = f"{method} {safe_url(response.url)} answered {status}"
        if message:
            text += f": {message}"
        if status == 429 or status >= 500:
            raise TransientError(text)
        raise TransferError(text)


def _describe(exc: BaseException) -> str:
    """An exception as a short phrase: its message, or its type when it has none."""
    return str(exc) or type(exc).__name__
