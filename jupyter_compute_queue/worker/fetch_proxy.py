"""A forward proxy on 127.0.0.1 that connects only where a :class:`~.fetch_policy.FetchPolicy`
allows: how ``git``, a separate program, fetches a job's build context under the policy.

git (through libcurl) sends every HTTP(S) connection of a clone to it, redirects included:
``CONNECT host:port`` for https, an absolute-URI request for http. For the ``git://`` protocol,
``core.gitProxy`` runs a small script (written next to the context) that tunnels through the
same ``CONNECT``. Each of those resolves and checks its destination in this process at connect
time (:meth:`FetchPolicy.connect`), so git never connects anywhere itself. A refusal is
answered ``403`` and remembered, so the build fails naming the reason rather than git's
"returned error: 403".
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import socketserver
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

from .fetch_policy import FetchPolicy, FetchRefused

__all__ = ["FetchProxy", "tunnel"]

#: The longest request head taken (git's are a few hundred bytes).
_HEAD_MAX = 64 * 1024
#: Headers meant for the proxy or for one hop, not for the server.
_HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authorization"})
#: Environment variables that would send git's connections elsewhere, or past the proxy.
_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


class FetchProxy:
    """The proxy, serving while the ``with`` block runs (a thread per connection)."""

    def __init__(self, policy: FetchPolicy, timeout: float = 120.0) -> None:
        self.policy = policy
        self.timeout = timeout
        #: What was refused, in order: each with ``url`` the destination (a URL, or
        #: ``host:port`` for a tunnel).
        self.refused: list[FetchRefused] = []
        self._server: socketserver.ThreadingTCPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "the proxy is not running"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FetchProxy:
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._handle(self.request)

        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True).start()
        self._server = server
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # --- for git ----------------------------------------------------------------------------

    def git_options(self, folder: Path) -> list[str]:
        """``git -c`` options: every HTTP(S) connection through the proxy, ``git://`` through a
        tunnel script written to ``folder``, and no other protocol (no ``file://``, no ssh)."""
        script = folder / "git-proxy"
        package = Path(__file__).resolve().parents[2]
        script.write_text(
            f"#!{sys.executable}\n"
            "import sys\n"
            f"sys.path.insert(0, {str(package)!r})\n"
            "from jupyter_compute_queue.worker.fetch_proxy import tunnel\n"
            f"sys.exit(tunnel({self.url!r}, sys.argv[1], sys.argv[2]))\n"
        )
        script.chmod(0o700)
        options = {
            "http.proxy": self.url,
            "core.gitProxy": str(script),
            "protocol.allow": "never",
            "protocol.http.allow": "always",
            "protocol.https.allow": "always",
            "protocol.git.allow": "always",
        }
        return [arg for name, value in options.items() for arg in ("-c", f"{name}={value}")]

    def git_environment(self, env: Mapping[str, str], folder: Path) -> dict[str, str]:
        """``env`` with the proxy variables pointing here and no ``no_proxy`` (libcurl would
        connect straight to the hosts it names); ``GIT_PROXY_COMMAND`` beats ``core.gitProxy``,
        so it is set too (to the script :meth:`git_options` wrote in ``folder``)."""
        kept = {k: v for k, v in env.items() if k.lower() not in _PROXY_VARIABLES}
        for name in ("http_proxy", "https_proxy", "all_proxy"):
            kept[name] = kept[name.upper()] = self.url
        kept["GIT_PROXY_COMMAND"] = str(folder / "git-proxy")
        return kept

    # --- serving ------------------------------------------------------------------------------

    def _handle(self, client: socket.socket) -> None:
        client.settimeout(self.timeout)
        try:
            head, rest = _read_head(client)
            line, *headers = head.decode("latin-1").split("\r\n")
            method, target, version = line.split(" ")
        except (OSError, ValueError):
            _answer(client, 400, "a proxy request was expected")
            return
        try:
            if method == "CONNECT":
                host, _, port = target.rpartition(":")
                destination = target
                upstream = self.policy.connect(host.strip("[]"), int(port), self.timeout)
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                split = urlsplit(target)
                if split.scheme != "http" or not split.hostname:
                    _answer(client, 400, f"only http:// requests and CONNECT: {line}")
                    return
                destination = f"http://{split.netloc.rpartition('@')[2]}{split.path}"
                upstream = self.policy.connect(split.hostname, split.port or 80, self.timeout)
                path = (split.path or "/") + (f"?{split.query}" if split.query else "")
                kept = [
                    h
                    for h in headers
                    if h and h.split(":", 1)[0].strip().lower() not in _HOP_HEADERS
                ]
                request = "".join(f"{h}\r\n" for h in [f"{method} {path} {version}", *kept])
                rest = (request + "Connection: close\r\n\r\n").encode("latin-1") + rest
        except FetchRefused as exc:
            exc.url = destination
            self.refused.append(exc)
            _answer(client, 403, str(exc))
            return
        except (OSError, ValueError) as exc:
            _answer(client, 502, f"{target}: {exc}")
            return
        with upstream:
            upstream.settimeout(self.timeout)
            with contextlib.suppress(OSError):
                if rest:
                    upstream.sendall(rest)
                _relay(client, upstream, self.timeout)


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """A request head, and the bytes read past it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk or len(data) > _HEAD_MAX:
            raise ValueError("no request head")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _answer(sock: socket.socket, status: int, text: str) -> None:
    body = text.encode("utf-8", "replace")
    reason = {400: "Bad Request", 403: "Forbidden", 502: "Bad Gateway"}[status]
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    with contextlib.suppress(OSError):
        sock.sendall(head.encode("latin-1") + body)


def _relay(a: socket.socket, b: socket.socket, timeout: float) -> None:
    """Copy bytes both ways until both sides have closed (or nothing moves for ``timeout``)."""
    with selectors.DefaultSelector() as selector:
        selector.register(a, selectors.EVENT_READ, b)
        selector.register(b, selectors.EVENT_READ, a)
        open_sides = 2
        while open_sides:
            events = selector.select(timeout)
            if not events:
                return
            for key, _ in events:
                source, target = key.fileobj, key.data
                assert isinstance(source, socket.socket)
                data = source.recv(65536)
                if not data:
                    selector.unregister(source)
                    open_sides -= 1
                    with contextlib.suppress(OSError):
                        target.shutdown(socket.SHUT_WR)
                    continue
                target.sendall(data)


def tunnel(proxy: str, host: str, port: str) -> int:
    """git's ``core.gitProxy``: connect ``host:port`` through the proxy's ``CONNECT`` and join
    it to standard input and output. The exit status: 0, or 1 with the proxy's answer on
    standard error."""
    split = urlsplit(proxy)
    with socket.create_connection((split.hostname or "127.0.0.1", split.port or 80)) as sock:
        sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        try:
            head, rest = _read_head(sock)
        except ValueError:
            print("fetch proxy: no answer", file=sys.stderr)
            return 1
        if head.split(b" ", 2)[1:2] != [b"200"]:
            print(
                f"fetch proxy: {head.decode('latin-1')} {rest.decode(errors='replace')}",
                file=sys.stderr,
            )
            return 1
        if rest:
            os.write(1, rest)
        with selectors.DefaultSelector() as selector:
            selector.register(0, selectors.EVENT_READ)
            selector.register(sock, selectors.EVENT_READ)
            while True:  # until the server closes: git has had all it asked for
                for key, _ in selector.select():
                    if key.fileobj == 0:
                        data = os.read(0, 65536)
                        if data:
                            sock.sendall(data)
                        else:
                            selector.unregister(0)
                            sock.shutdown(socket.SHUT_WR)
                        continue
                    data = sock.recv(65536)
                    if not data:
                        return 0
                    view = memoryview(data)
                    while view:
                        view = view[os.write(1, view) :]
