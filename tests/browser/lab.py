"""A real JupyterLab for browser tests: the server process, and driving notebooks in a page.

The server is ``python -m jupyterlab`` from this venv, with its own root, data, settings and
runtime folders, a non-root base URL and a token. The page helpers go through the UI the way a
person would (type, Shift+Enter) and wait on what the UI shows.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.browser.chromium import INSTALL_PLAYWRIGHT, missing

try:
    from playwright.sync_api import Locator, Page, expect
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
except ImportError:  # the test extra has it: only a half-done install gets here
    missing("Playwright is not installed", INSTALL_PLAYWRIGHT)

__all__ = [
    "LabServer",
    "Locator",
    "Page",
    "expect",
    "open_notebook",
    "run_cell",
    "terminal",
    "wait_for_cell",
]

BASE_URL = "/cq-lab/"
START_TIMEOUT = 60.0
# The news toast and the update check would cover the page (and reach for the network).
NOTIFICATION_SETTINGS = {"fetchNews": "false", "checkForUpdates": False}


class PortTaken(RuntimeError):
    """JupyterLab could not bind its port: another process took it after it was chosen."""


def _with_port(arg: str, port: int) -> str:
    return f"--ServerApp.port={port}" if arg.startswith("--ServerApp.port=") else arg


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LabServer:
    """A ``jupyter lab`` subprocess; ``url`` ends with the base URL's ``/``."""

    root: Path
    local_worker: bool = False
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{BASE_URL}"

    @property
    def notebooks(self) -> Path:
        return self.root / "notebooks"

    @property
    def log_path(self) -> Path:
        return self.root / "jupyter-lab.log"

    def start(self) -> None:
        settings = self.root / "settings" / "@jupyterlab" / "apputils-extension"
        settings.mkdir(parents=True)
        (settings / "notification.jupyterlab-settings").write_text(
            json.dumps(NOTIFICATION_SETTINGS)
        )
        for name in ("notebooks", "data", "config", "runtime", "jupyter-data", "ipython"):
            (self.root / name).mkdir()
        env = {
            **os.environ,
            "JUPYTERLAB_SETTINGS_DIR": str(self.root / "settings"),
            "JUPYTERLAB_WORKSPACES_DIR": str(self.root / "workspaces"),
            # The user's own config and data stay out; the venv's (sys.prefix) are still read,
            # which is where the installed extensions are.
            "JUPYTER_CONFIG_DIR": str(self.root / "config"),
            "JUPYTER_DATA_DIR": str(self.root / "jupyter-data"),
            "JUPYTER_RUNTIME_DIR": str(self.root / "runtime"),
            "IPYTHONDIR": str(self.root / "ipython"),
        }
        command = [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--ServerApp.base_url={BASE_URL}",
            f"--ServerApp.root_dir={self.notebooks}",
            f"--IdentityProvider.token={self.token}",
            "--ServerApp.allow_root=True",
            "--ServerApp.terminals_enabled=False",
            "--LabApp.expose_app_in_browser=True",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            f"--ComputeQueueApp.data_dir={self.root / 'data'}",
            f"--ComputeQueueApp.local_worker={self.local_worker}",
        ]
        # The port was free when chosen; another test's server may take it before JupyterLab
        # binds it. JupyterLab then exits (port_retries=0) saying so: start again on another.
        for attempt in range(3):
            with self.log_path.open("wb") as log:
                self.process = subprocess.Popen(
                    [_with_port(a, self.port) for a in command],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.root,
                )
            try:
                self._wait_ready()
                return
            except PortTaken:
                if attempt == 2:
                    raise
                self.stop()
                self.port = free_port()

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if "already in use" in self.log():
                    raise PortTaken(self.port)
                raise RuntimeError(f"jupyter lab exited ({self.process.returncode}):\n{self.log()}")
            # Something else may answer on the port until JupyterLab gives up on it (not HTTP).
            with contextlib.suppress(OSError, http.client.HTTPException):
                if self.api("GET", "api/status") is not None:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"jupyter lab did not answer in {START_TIMEOUT:.0f} s:\n{self.log()}")

    def log(self, tail: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-tail:])

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """Calls the server's REST API with the token; the JSON answer."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read()
        return json.loads(text) if text else None

    def create_notebook(self, path: str, cells: Sequence[str] = ()) -> str:
        """Writes a notebook (Python 3 kernel) through the contents API; its path."""
        content = {
            "nbformat": 4,
            "nbformat_minor": 5,
            "metadata": {
                "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
            },
            "cells": [
                {
                    "cell_type": "code",
                    "id": uuid.uuid4().hex[:8],
                    "source": source,
                    "metadata": {},
                    "outputs": [],
                    "execution_count": None,
                }
                for source in [*cells, ""]
            ],
        }
        self.api("PUT", f"api/contents/{path}", {"type": "notebook", "content": content})
        return path


def workspace_url(server: LabServer, name: str) -> str:
    return f"{server.url}lab/workspaces/{name}?reset&token={server.token}"


def load_lab(page: Page, url: str, lost: list[str], attempts: int = 3) -> None:
    """Opens JupyterLab at ``url`` and waits for it, loading the page again when Chromium
    dropped one of its scripts with ERR_NETWORK_CHANGED (``lost`` collects those URLs).

    Chromium aborts every request in flight when a network interface appears or goes, and
    the Docker tests running beside this one create bridges and veth pairs all the time: a
    fresh-clone CI run lost ``jlab_core.js`` that way and the page never started. A lost
    script is the machine's doing, not the product's, so the page is loaded again; any other
    failure still fails the test."""
    for attempt in range(attempts):
        lost.clear()
        page.goto(url)
        try:
            wait_for_lab(page)
            return
        except PlaywrightTimeoutError:
            if not lost or attempt == attempts - 1:
                raise
            print(f"reloading JupyterLab: the network changed under {len(lost)} request(s)")


def wait_for_lab(page: Page) -> None:
    """Waits until JupyterLab has started and restored its layout."""
    page.wait_for_function("() => window.jupyterapp !== undefined", timeout=30_000)
    page.evaluate("() => window.jupyterapp.restored")


def open_notebook(page: Page, path: str) -> Locator:
    """Opens a notebook in the main area and waits for its kernel to be idle; its panel."""
    widget_id = page.evaluate(
        """async path => {
            const widget = await window.jupyterapp.commands.execute('docmanager:open', {path});
            await widget.context.ready;
            return widget.id;
        }""",
        path,
    )
    panel = page.locator(f'[id="{widget_id}"]')
    expect(panel.locator(".jp-Cell").first).to_be_visible(timeout=30_000)
    # The kernel status of the current notebook, as the status bar shows it.
    expect(page.locator("#jp-main-statusbar")).to_contain_text(
        re.compile(r"Python 3 \(ipykernel\) \| Idle"), timeout=60_000
    )
    return panel


def run_cell(
    page: Page, panel: Locator, code: str, timeout: float = 60_000, wait: bool = True
) -> Locator:
    """Types `code` into the notebook's active cell, runs it with Shift+Enter, waits for it
    (with ``wait=False`` only until it has started, for cells that block).

    Returns the cell, whose ``.jp-OutputArea`` holds what it showed.
    """
    index = panel.locator(".jp-Cell.jp-mod-active").get_attribute("data-windowed-list-index")
    cell = panel.locator(f'.jp-Cell[data-windowed-list-index="{index}"]')
    cell.locator(".cm-content").click()
    # insert_text, not type: typing would trigger the editor's bracket auto-closing.
    page.keyboard.insert_text(code)
    page.keyboard.press("Shift+Enter")
    if wait:
        wait_for_cell(cell, timeout)
    else:
        expect(cell.locator(".jp-InputPrompt")).to_have_text(re.compile(r"\[[*\d]+\]"))
    return cell


def wait_for_cell(cell: Locator, timeout: float = 60_000) -> None:
    """Waits until the cell has run (its prompt shows its execution count)."""
    expect(cell.locator(".jp-InputPrompt")).to_have_text(re.compile(r"\[\d+\]"), timeout=timeout)


def terminal(view: Locator) -> Locator:
    """The rows of the job view's terminal (xterm.js renders them as text)."""
    return view.locator(".jcq-terminal .xterm-rows")
