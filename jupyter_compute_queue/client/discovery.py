"""Where the client's queue host is: explicit settings, else the Jupyter server of this kernel.

The client (:mod:`jupyter_compute_queue.client`) looks, in this order:

1. the ``url`` (and ``token``) it was given;
2. ``COMPUTE_QUEUE_URL`` and ``COMPUTE_QUEUE_TOKEN``: the Jupyter server URL including its base
   URL (``http://host:8888/base/``), or the ``…/compute-queue/`` API URL itself;
3. the runtime files (``jpserver-<pid>.json``) of the Jupyter servers running on this machine,
   in ``JUPYTER_RUNTIME_DIR`` (default: Jupyter's runtime dir) and, in a kernel, in the folder
   of the kernel's connection file (where its server keeps them too). The server whose pid is the
   kernel's parent wins (also ``JPY_PARENT_PID``, which Jupyter sets for the kernels it starts,
   and further ancestors, so a script run in a Jupyter terminal finds its server); else the
   server whose root folder contains the kernel's working folder (the deepest such root).
   Files of servers that are no longer running are ignored. A server file without a token
   under JupyterHub (``JUPYTERHUB_API_TOKEN`` set) uses the hub token;
4. under JupyterHub, ``JUPYTERHUB_SERVICE_URL`` with ``JUPYTERHUB_API_TOKEN``.

A token given explicitly goes to a discovered URL too, but a URL given explicitly never gets a
token from the environment: ``COMPUTE_QUEUE_TOKEN`` and the hub token are only sent where they
belong. Every step that did not give a host is recorded, so that the error can list them.
Discovery reads files only: it never deletes stale runtime files and never makes a request.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

__all__ = ["API_PATH", "Host", "ServerFile", "find_host", "normalize_url", "running_servers"]

#: The extension's routes under the Jupyter server's base URL.
API_PATH = "compute-queue/"
#: How many ancestors of this process are matched against server pids.
MAX_ANCESTORS = 16


@dataclass(frozen=True)
class Host:
    """A queue host: the Jupyter server URL (with its base URL, ending in ``/``), the token to
    send (None: none, e.g. a public host), and how it was found."""

    url: str
    token: str | None
    source: str
    #: The runtime file it was found in, if it was.
    server_file: Path | None = None

    @property
    def api(self) -> str:
        """The compute-queue API URL, ``{url}compute-queue/``."""
        return self.url + API_PATH


@dataclass(frozen=True)
class ServerFile:
    """One Jupyter server runtime file, as far as discovery needs it."""

    path: Path
    pid: int | None
    url: str | None
    token: str
    root_dir: str | None
    sock: str | None

    @classmethod
    def read(cls, path: Path) -> ServerFile | None:
        """Parse a runtime file; None if it is unreadable or not JSON (e.g. being written)."""
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(info, dict):
            return None
        pid = info.get("pid")
        url = info.get("url")
        token = info.get("token")
        root = info.get("root_dir") or info.get("notebook_dir")  # the classic Notebook's name
        sock = info.get("sock")
        return cls(
            path=path,
            pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
            url=url if isinstance(url, str) and url else _url_from_parts(info),
            token=token if isinstance(token, str) else "",
            root_dir=root if isinstance(root, str) and root else None,
            sock=sock if isinstance(sock, str) and sock else None,
        )


def _url_from_parts(info: Mapping[str, Any]) -> str | None:
    """The server URL from ``hostname``/``port``/``base_url`` when ``url`` is missing."""
    port = info.get("port")
    if not isinstance(port, int):
        return None
    host = info.get("hostname") or "localhost"
    base = info.get("base_url") or "/"
    scheme = "https" if info.get("secure") else "http"
    return f"{scheme}://{host}:{port}{base}"


def normalize_url(url: str) -> tuple[str, str | None]:
    """The Jupyter server URL (ending in ``/``) of a URL someone gave, and the token in its
    query if it has one (``http://h:8888/base/?token=abc``).

    A URL of the API itself (``…/compute-queue/``) gives its server URL. ValueError unless it
    is an absolute http(s) URL.
    """
    split = urlsplit(url.strip())
    if split.scheme not in ("http", "https") or not split.netloc:
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    tokens = parse_qs(split.query).get("token")
    path = split.path if split.path.endswith("/") else split.path + "/"
    if path.endswith("/" + API_PATH):
        path = path[: -len(API_PATH)]
    return urlunsplit((split.scheme, split.netloc, path, "", "")), (tokens[0] if tokens else None)


def runtime_dir(environ: Mapping[str, str]) -> Path:
    """Where Jupyter servers write their runtime files."""
    configured = environ.get("JUPYTER_RUNTIME_DIR")
    if configured:
        return Path(configured)
    try:
        from jupyter_core.paths import jupyter_runtime_dir

        return Path(jupyter_runtime_dir())
    except ImportError:  # pragma: no cover - jupyter_core comes with jupyter_server
        return Path.home() / ".local" / "share" / "jupyter" / "runtime"


def kernel_runtime_dir() -> Path | None:
    """The folder of this kernel's connection file, when this is an IPython kernel: the
    server that started it keeps its runtime files there too, even when its runtime dir was
    set on its command line (``--ServerApp.runtime_dir``) where the kernel cannot see it."""
    if "ipykernel" not in sys.modules:  # not a kernel: never import ipykernel for this
        return None
    try:
        from ipykernel.kernelapp import IPKernelApp

        if not IPKernelApp.initialized():
            return None
        connection_file = IPKernelApp.instance().abs_connection_file
    except Exception:  # an odd kernel: discovery goes on without it
        return None
    return Path(connection_file).parent if connection_file else None


def running_servers(folder: Path) -> tuple[list[ServerFile], list[str]]:
    """The runtime files of running servers in ``folder``, and notes on the files skipped."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        return [], [f"no runtime folder {folder} ({exc.strerror or exc})"]
    servers: list[ServerFile] = []
    notes: list[str] = []
    for name in names:
        if not (name.startswith(("jpserver-", "nbserver-")) and name.endswith(".json")):
            continue
        info = ServerFile.read(folder / name)
        if info is None:
            notes.append(f"{name}: unreadable")
        elif info.pid is None or not pid_alive(info.pid):
            notes.append(f"{name}: server pid {info.pid} is not running")
        elif info.sock:
            notes.append(f"{name}: listens on a Unix socket ({info.sock}), not supported")
        elif not info.url:
            notes.append(f"{name}: has no URL")
        else:
            servers.append(info)
    return servers, notes


def pid_alive(pid: int) -> bool:
    """Whether a process exists (on Windows every pid is taken as running)."""
    if pid <= 0:
        return False
    if sys.platform == "win32":  # os.kill(pid, 0) would terminate the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, it is someone else's
        return True
    except OSError:
        return False
    return True


def ancestors(environ: Mapping[str, str]) -> list[int]:
    """This process's parent, ``JPY_PARENT_PID`` (the Jupyter server that started this
    kernel, when something sits in between), then the parent's ancestors (Linux only)."""
    parent = os.getppid()
    pids = [parent]
    jpy = environ.get("JPY_PARENT_PID", "")
    if jpy.isdigit() and int(jpy) not in pids:
        pids.append(int(jpy))
    pid = parent
    while len(pids) < MAX_ANCESTORS and pid > 1:
        pid = _parent_of(pid)
        if pid <= 1 or pid in pids:
            break
        pids.append(pid)
    return pids


def _parent_of(pid: int) -> int:
    """The parent pid from ``/proc`` (0 where there is no ``/proc``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    # "pid (command name, may hold spaces and parens) state ppid …"
    fields = stat.rpartition(")")[2].split()
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return a == b


def _contains(root: str, folder: Path) -> bool:
    try:
        folder.relative_to(Path(root).resolve())
    except (OSError, ValueError):
        return False
    return True


def _from_server(
    info: ServerFile, why: str, token: str | None, environ: Mapping[str, str]
) -> Host | None:
    assert info.url is not None
    try:
        url, query_token = normalize_url(info.url)
    except ValueError:
        return None
    chosen = token or info.token or query_token
    source = f"Jupyter server {info.path} ({why})"
    hub = environ.get("JUPYTERHUB_API_TOKEN")
    if not chosen and hub:
        chosen = hub
        source += " with $JUPYTERHUB_API_TOKEN"
    return Host(url, chosen or None, source, info.path)


def find_host(
    url: str | None = None,
    token: str | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> tuple[Host | None, list[str]]:
    """The host to use, or None; and what was tried, one line per place looked at."""
    env = os.environ if environ is None else environ
    tried: list[str] = []
    if url:
        server, query_token = normalize_url(url)
        return Host(server, token or query_token, "the url given"), tried
    tried.append("Client(url=…): not given")

    env_url = env.get("COMPUTE_QUEUE_URL", "").strip()
    if env_url:
        try:
            server, query_token = normalize_url(env_url)
        except ValueError as exc:
            tried.append(f"$COMPUTE_QUEUE_URL: {exc}")
        else:
            chosen = token or env.get("COMPUTE_QUEUE_TOKEN") or query_token
            return Host(server, chosen or None, "$COMPUTE_QUEUE_URL"), tried
    else:
        tried.append("$COMPUTE_QUEUE_URL: not set")

    folder = runtime_dir(env)
    servers, notes = running_servers(folder)
    folders = str(folder)
    kernel_folder = kernel_runtime_dir()
    if kernel_folder is not None and not _same_folder(kernel_folder, folder):
        more, more_notes = running_servers(kernel_folder)
        servers += more
        notes += more_notes
        folders += f" and {kernel_folder} (this kernel's)"
    here = (cwd or Path.cwd()).resolve()
    lineage = ancestors(env)
    by_pid = {s.pid: s for s in servers}
    for pid in lineage:
        if pid in by_pid:
            why = (
                "its pid is this process's parent"
                if pid == lineage[0]
                else f"its pid {pid} is an ancestor of this process"
            )
            host = _from_server(by_pid[pid], why, token, env)
            if host is not None:
                return host, tried
    roots = [s for s in servers if s.root_dir and _contains(s.root_dir, here)]
    if roots:
        best = max(roots, key=lambda s: (len(Path(s.root_dir or "/").resolve().parts), s.path))
        host = _from_server(best, f"its root {best.root_dir} contains {here}", token, env)
        if host is not None:
            return host, tried
    for info in servers:
        notes.append(
            f"{info.path.name}: pid {info.pid} is not an ancestor of this process "
            f"(parent {lineage[0]}) and its root {info.root_dir} does not contain {here}"
        )
    if not servers and not notes:
        notes.append("no server files")
    tried.append(f"Jupyter runtime files in {folders}: " + "; ".join(notes))

    hub_url = env.get("JUPYTERHUB_SERVICE_URL", "").strip()
    if hub_url:
        try:
            server, _ = normalize_url(hub_url)
        except ValueError as exc:
            tried.append(f"$JUPYTERHUB_SERVICE_URL: {exc}")
        else:
            chosen = token or env.get("JUPYTERHUB_API_TOKEN")
            return Host(server, chosen or None, "$JUPYTERHUB_SERVICE_URL"), tried
    else:
        tried.append("$JUPYTERHUB_SERVICE_URL (JupyterHub): not set")
    return None, tried
