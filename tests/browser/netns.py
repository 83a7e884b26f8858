"""Chromium in a network namespace of its own, so that Docker's bridges do not reach it.

Chromium drops every request in flight with ``ERR_NETWORK_CHANGED`` when an address appears or
goes on any interface, loopback requests included, and the Docker tests running beside the
browser tests create networks and veth pairs all the time: a fresh-clone CI run lost
JupyterLab's ``jlab_core.js`` that way. In a namespace of its own Chromium sees only its own
loopback, where nothing changes. Each JupyterLab server's port is forwarded in: the inside half
(:mod:`tests.browser.netns_inside`) listens on the same port inside and passes connections out
over a Unix socket to this half, which connects to the server. Playwright talks to Chromium
over pipes, which cross namespaces. Needs root (``unshare --net``) and util-linux's
``nsenter``; without them Chromium runs as before, in the machine's namespace.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

from tests.browser.netns_inside import splice

INSIDE = Path(__file__).with_name("netns_inside.py")


def can_shelter() -> bool:
    """Whether this process may make a network namespace and enter it."""
    return os.geteuid() == 0 and all(shutil.which(tool) for tool in ("unshare", "nsenter", "ip"))


class Shelter:
    """A network namespace holding only loopback and the forwarded JupyterLab ports."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._socket_path = root / "forward.sock"
        self._exposed: set[int] = set()
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self._socket_path))
        self._listener.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()
        self._inside = subprocess.Popen(
            ["unshare", "--net", "--", sys.executable, str(INSIDE), str(self._socket_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._expect("ready")

    def _expect(self, line: str) -> None:
        assert self._inside.stdout is not None
        got = self._inside.stdout.readline().strip()
        if got != line:
            raise RuntimeError(f"the network namespace's forwarder said {got!r}, not {line!r}")

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(conn,), daemon=True).start()

    @staticmethod
    def _connect(conn: socket.socket) -> None:
        try:
            header = conn.recv(2, socket.MSG_WAITALL)
            (port,) = struct.unpack("!H", header)
            server = socket.create_connection(("127.0.0.1", port))
        except (OSError, struct.error):
            conn.close()
            return
        splice(conn, server)

    def expose(self, port: int) -> None:
        """Makes ``127.0.0.1:port`` inside reach ``127.0.0.1:port`` outside."""
        with self._lock:
            if port in self._exposed:
                return
            assert self._inside.stdin is not None
            self._inside.stdin.write(f"{port}\n")
            self._inside.stdin.flush()
            self._expect(f"listening {port}")
            self._exposed.add(port)

    def wrap(self, executable: Path) -> Path:
        """A script that runs ``executable`` inside the namespace, for Playwright to launch."""
        script = self._root / "chromium-sheltered"
        script.write_text(
            f'#!/bin/sh\nexec nsenter --net=/proc/{self._inside.pid}/ns/net -- {executable} "$@"\n'
        )
        script.chmod(0o755)
        return script

    def close(self) -> None:
        if self._inside.stdin is not None:
            self._inside.stdin.close()
        try:
            self._inside.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._inside.kill()
            self._inside.wait()
        self._listener.close()
