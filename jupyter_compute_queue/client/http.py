"""The client's small synchronous HTTP layer: ``http.client``, one connection per request.

Redirects are followed by hand: the token goes only to URLs under the host's API, never to a
presigned blob-store URL a 307 points at, nor anywhere after the chain left the host. Uploads
send ``Expect: 100-continue``, so a host that redirects an upload (S3) answers before the body
is sent. Proxies (``HTTP_PROXY``) are not used. Errors are :class:`ComputeQueueError` with the
host's ``{"error"}`` message and the HTTP status.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import SplitResult, quote, urlencode, urljoin, urlsplit

from .errors import ComputeQueueError

#: Bytes per read and write while streaming.
CHUNK = 256 * 1024
#: Redirect hops followed before giving up.
MAX_REDIRECTS = 10
#: How long an upload waits for ``100 Continue`` before sending the body anyway.
CONTINUE_WAIT = 1.0

REDIRECTS = frozenset({301, 302, 303, 307, 308})
_RETRY_STATUS = frozenset({502, 503, 504})
_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT"})
DEFAULT_PORTS = {"http": 80, "https": 443}


def blob_upload_headers(key: str) -> dict[str, str]:
    """Headers of ``PUT f/{key}``, sent again on each hop of its redirects: a host that keeps
    blobs in S3 answers with a URL presigned for exactly this type and SHA-256 checksum (the
    key, as base64), and S3 refuses bytes that do not match it. A local host ignores them."""
    checksum = base64.b64encode(bytes.fromhex(key)).decode("ascii")
    return {"Content-Type": "application/octet-stream", "x-amz-checksum-sha256": checksum}


def safe(url: str) -> str:
    """``url`` without user info, query or fragment (tokens and signatures live there)."""
    split = urlsplit(url)
    netloc = split.netloc.rpartition("@")[2]
    return f"{split.scheme}://{netloc}{split.path}"


def origin(split: SplitResult) -> tuple[str, str, int]:
    """Scheme, host and port, with the scheme's default port made explicit."""
    return (
        split.scheme,
        (split.hostname or "").lower(),
        split.port or DEFAULT_PORTS.get(split.scheme, 0),
    )


def under_api(split: SplitResult, api: SplitResult) -> bool:
    """Whether a URL is under the host's API (same scheme, host and port, and under its
    path): only such URLs get the token."""
    return origin(split) == origin(api) and split.path.startswith(api.path)


class HeadThenSocket(io.RawIOBase):
    """Bytes already read from a socket, then the socket: lets ``HTTPResponse`` parse an
    answer whose head was consumed while waiting for ``100 Continue``."""

    def __init__(self, head: bytes, sock: socket.socket) -> None:
        self._head = head
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        return self._sock.recv_into(buffer)


class Replay:
    """A stand-in socket for ``HTTPResponse``: only ``makefile`` is used."""

    def __init__(self, head: bytes, sock: socket.socket) -> None:
        self._head = head
        self._sock = sock

    def makefile(self, mode: str, *args: object, **kwargs: object) -> io.BufferedReader:
        return io.BufferedReader(HeadThenSocket(self._head, self._sock))


@dataclass
class Body:
    """A streamed request body: ``size`` bytes from a fresh iterator per attempt (a redirect or
    a retry sends it again from the start)."""

    size: int
    chunks: Callable[[], Iterator[bytes]]


_C = TypeVar("_C", bound="Closing")


class Closing:
    """``with`` closes it: the context-manager half of every closable client object."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Reply(Closing):
    """One HTTP response and its connection; closing it closes both."""

    def __init__(
        self, url: str, conn: http.client.HTTPConnection, response: http.client.HTTPResponse
    ) -> None:
        self.url = url
        self.status = response.status
        self._conn = conn
        self._response = response
        #: Added to the error message (e.g. why no token was sent, on a 401).
        self.hint: str | None = None

    def header(self, name: str) -> str | None:
        return self._response.getheader(name)

    def read(self, size: int | None = None) -> bytes:
        """Up to ``size`` bytes of the body (all of it when None)."""
        return self._response.read(size)

    def error_text(self, limit: int) -> str:
        """The start of the body (at most ``limit`` bytes read) as an error message: the
        ``{"error"}`` of a JSON body, else the text; empty when it cannot be read."""
        try:
            raw = self._response.read(limit)
        except (OSError, http.client.HTTPException):
            return ""
        text = raw.decode("utf-8", "replace").strip()
        with contextlib.suppress(ValueError):
            data = json.loads(text)
            if isinstance(data, dict) and isinstance(data.get("error"), str):
                text = data["error"]
        return text

    def error(self, method: str) -> ComputeQueueError:
        """The answer as an error: the host's ``{"error"}`` message, else the start of the body."""
        text = self.error_text(64 * 1024)
        if not text:
            text = f"{method} {safe(self.url)} answered {self.status} {self._response.reason}"
        text = text[:2000]
        if self.hint:
            text += f" ({self.hint})"
        return ComputeQueueError(text, self.status, safe(self.url))

    def close(self) -> None:
        self._response.close()
        self._conn.close()


class HttpClient:
    """Requests to the compute-queue API at ``api_url`` (ending in ``/``; relative paths are
    under it), with ``token`` sent only while a redirect chain stays under it."""

    def __init__(self, api_url: str, token: str | None, timeout: float) -> None:
        self.api_url = api_url
        self.token = token
        self.timeout = timeout
        #: Said with a 401 when no token was sent: how to give one (set by the client when
        #: discovery found a server that writes no token, e.g. one with a password login).
        self.no_token_hint: str | None = None
        self._api = urlsplit(self.api_url)
        self._ssl = ssl.create_default_context()

    def _url(self, path: str, query: Mapping[str, Any] | None = None) -> str:
        url = path if "://" in path else self.api_url + path
        if query:
            url += ("&" if "?" in url else "?") + urlencode(query, doseq=True)
        return url

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"} if self.token else {}

    def _json(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        payload: Any = None,
    ) -> Any:
        """A JSON request; the parsed answer, or ComputeQueueError with the host's message."""
        headers = {"Accept": "application/json"}
        body = None
        if payload is not None:
            try:
                body = json.dumps(payload, ensure_ascii=False).encode()
            except UnicodeEncodeError:  # a lone surrogate: sent escaped, for the host to name
                body = json.dumps(payload).encode()
            headers["Content-Type"] = "application/json"
        with self._request(method, path, query=query, headers=headers, body=body) as reply:
            if not 200 <= reply.status < 300:
                raise reply.error(method)
            raw = reply.read()
        try:
            return json.loads(raw)
        except ValueError:
            raise ComputeQueueError(
                f"{method} {safe(self._url(path))} answered something that is not JSON",
                reply.status,
            ) from None

    def _request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | Body | None = None,
    ) -> Reply:
        """Send a request (retrying idempotent ones on connection errors and 502-504); the
        caller closes the reply, whatever its status."""
        url = self._url(path, query)
        attempts = 3 if method in _IDEMPOTENT else 1
        for attempt in range(attempts):
            try:
                reply = self._follow(method, url, headers or {}, body)
            except ComputeQueueError:
                raise
            except (OSError, http.client.HTTPException) as exc:
                error = ComputeQueueError(
                    f"{method} {safe(url)}: cannot reach the host ({exc or type(exc).__name__})"
                )
            else:
                if reply.status == 401 and not self.token:
                    reply.hint = self.no_token_hint
                if reply.status not in _RETRY_STATUS or attempt + 1 >= attempts:
                    return reply
                error = reply.error(method)
                reply.close()
            if attempt + 1 >= attempts:
                raise error
            time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _follow(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | Body | None
    ) -> Reply:
        """One request with its redirects; the token only while the chain stays on the API."""
        trusted = True
        for _hop in range(MAX_REDIRECTS + 1):
            split = urlsplit(url)
            if split.scheme not in DEFAULT_PORTS or not split.hostname:
                raise ComputeQueueError(f"{safe(url)}: only http and https URLs can be used")
            trusted = trusted and under_api(split, self._api)
            hop = dict(headers)
            if trusted:
                hop.update(self._auth_headers())
            reply = self._exchange(method, url, split, hop, body)
            if reply.status not in REDIRECTS:
                return reply
            with reply:
                location = reply.header("Location")
            if not location:
                raise ComputeQueueError(
                    f"{method} {safe(url)} redirected without a Location", reply.status
                )
            if method not in ("GET", "HEAD") and reply.status not in (307, 308):
                raise ComputeQueueError(
                    f"{method} {safe(url)} answered {reply.status}, which would drop the body",
                    reply.status,
                )
            url = urljoin(url, location)
        raise ComputeQueueError(f"{method} {safe(url)}: more than {MAX_REDIRECTS} redirects")

    def _exchange(
        self,
        method: str,
        url: str,
        split: SplitResult,
        headers: Mapping[str, str],
        body: bytes | Body | None,
    ) -> Reply:
        host, port = split.hostname or "", split.port or DEFAULT_PORTS[split.scheme]
        conn: http.client.HTTPConnection
        if split.scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=self.timeout, context=self._ssl)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        try:
            target = (split.path or "/") + (f"?{split.query}" if split.query else "")
            conn.putrequest(method, target, skip_accept_encoding=True)
            for name, value in headers.items():
                conn.putheader(name, value)
            if body is None:
                conn.endheaders()
            elif isinstance(body, bytes):
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
            else:
                conn.putheader("Content-Length", str(body.size))
                if body.size:
                    conn.putheader("Expect", "100-continue")
                conn.endheaders()
                early = self._await_continue(conn) if body.size else None
                if early is not None:  # answered before the body: a redirect, 401, 413 …
                    assert conn.sock is not None
                    response = http.client.HTTPResponse(
                        Replay(early, conn.sock),  # type: ignore[arg-type]
                        method=method,
                    )
                    response.begin()
                    return Reply(url, conn, response)
                try:
                    for chunk in body.chunks():
                        conn.send(chunk)
                except OSError:
                    # The host may have answered and closed mid-body: its answer says more.
                    with contextlib.suppress(OSError, http.client.HTTPException):
                        return Reply(url, conn, conn.getresponse())
                    raise
            return Reply(url, conn, conn.getresponse())
        except BaseException:
            conn.close()
            raise

    def _await_continue(self, conn: http.client.HTTPConnection) -> bytes | None:
        """Wait up to :data:`CONTINUE_WAIT` for the answer to ``Expect: 100-continue``: None
        means send the body (``100 Continue``, or silence); bytes are the head of a final
        answer sent instead. The head is read byte by byte: what follows is not ours."""
        sock = conn.sock
        assert sock is not None
        while True:
            sock.settimeout(CONTINUE_WAIT)
            try:
                first = sock.recv(1)
            except TimeoutError:
                return None
            finally:
                sock.settimeout(self.timeout)
            if not first:
                raise ConnectionError("the host closed the connection before answering")
            head = bytearray(first)
            while not head.endswith(b"\r\n\r\n"):
                byte = sock.recv(1)
                if not byte:
                    raise ConnectionError("the host closed the connection inside an answer")
                head += byte
                if len(head) > 64 * 1024:
                    raise http.client.HTTPException("answer head too long")
            status = bytes(head).split(b" ", 2)[1:2]
            if not status or not status[0].startswith(b"1"):
                return bytes(head)
            if status[0] == b"100":
                return None
            # another 1xx (103 Early Hints): wait for the real answer

    def _ws_url(self, queue: str) -> str:
        scheme = "wss" if self._api.scheme == "https" else "ws"
        return f"{scheme}://{self._api.netloc}{self._api.path}q/{quote(queue, safe='')}/ws"
