"""The inside half of :mod:`tests.browser.netns`, run as a script in the new network namespace.

It brings the namespace's loopback up, then for each port named on its stdin listens on
``127.0.0.1:PORT`` and hands every connection to the outside half over a Unix socket (a file,
so it crosses namespaces) that first gets the port as two bytes. It exits when its stdin closes.
Only the standard library: it runs under the venv's Python with nothing on its path.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import sys
import threading


def splice(a: socket.socket, b: socket.socket) -> None:
    """Copies bytes both ways between two connected sockets until both directions end, then
    closes both: one thread per direction, each passing its end of stream on."""
    done = threading.Semaphore(0)

    def copy(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
            done.release()

    def close_when_done() -> None:
        done.acquire()
        done.acquire()
        a.close()
        b.close()

    threading.Thread(target=copy, args=(a, b), daemon=True).start()
    threading.Thread(target=copy, args=(b, a), daemon=True).start()
    threading.Thread(target=close_when_done, daemon=True).start()


def _forward(listener: socket.socket, port: int, outside: str) -> None:
    while True:
        conn, _ = listener.accept()
        try:
            out = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            out.connect(outside)
            out.sendall(struct.pack("!H", port))
        except OSError:
            conn.close()
            continue
        splice(conn, out)


def main() -> None:
    outside = sys.argv[1]
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    print("ready", flush=True)
    for line in sys.stdin:
        port = int(line)
        listener = socket.create_server(("127.0.0.1", port))
        threading.Thread(target=_forward, args=(listener, port, outside), daemon=True).start()
        print(f"listening {port}", flush=True)


if __name__ == "__main__":
    main()
