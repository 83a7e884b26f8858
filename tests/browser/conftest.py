"""Browser tests: Playwright's sync API driving the system Chromium in a real JupyterLab.

One JupyterLab server and one browser per test session (per xdist worker: the browser tests
carry ``xdist_group("browser")`` and scripts/test.sh runs ``--dist loadgroup``, so they share
one worker). Each test gets a fresh page on a fresh workspace, and leaves a screenshot in
``test-artifacts/screenshots/<test name>.png``, passed or failed.

Chromium is Debian's, driven by Playwright (never ``playwright install``); without either the
tests skip saying what is missing, except under ``CI=true``, where they fail (chromium.py).

A test that needs the local worker (Docker) in its server marks itself ``local_worker``.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.browser.chromium import CHROMIUM_ARGS, INSTALL_PLAYWRIGHT, missing, require_chromium
from tests.browser.netns import Shelter, can_shelter

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Request

    from tests.browser.lab import LabServer

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"


class PlaywrightLoop:
    """Playwright's sync API keeps its event loop marked as running in this thread between its
    calls. pytest-asyncio refuses to run a test then, so the browser tests take the mark only
    while they run and clear it afterwards: other tests on the same xdist worker stay async."""

    loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def enter(cls) -> None:
        if cls.loop is not None:
            asyncio._set_running_loop(cls.loop)

    @staticmethod
    def leave() -> None:
        asyncio._set_running_loop(None)


@pytest.fixture(autouse=True)
def _playwright_loop(request: pytest.FixtureRequest) -> Iterator[None]:
    if "chromium" in request.fixturenames:
        PlaywrightLoop.enter()
    yield
    PlaywrightLoop.leave()


@pytest.fixture(autouse=True)
def _grouped(request: pytest.FixtureRequest) -> None:
    """Under ``--dist loadgroup`` xdist marks a grouped test's node id with ``@<group>``: that
    is how the browser tests reach one worker. pytest 9.2 stopped reading the attribute
    pytest-xdist 3.8 sets, and they spread silently over every worker, each starting its own
    JupyterLab servers and Chromium on a loaded machine: fail saying so instead."""
    if getattr(request.config.option, "loadgroup", False) and "@" not in request.node.nodeid:
        pytest.fail(
            "--dist loadgroup did not group this test onto one worker: this pytest-xdist does "
            "not work with this pytest (pyproject.toml pins the pair that does)"
        )


@pytest.fixture(scope="session")
def shelter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shelter | None]:
    """Chromium's own network namespace (see tests/browser/netns.py), where the machine allows
    one (root, util-linux, iproute2: CI has them); otherwise None and Chromium runs in the
    machine's namespace, where Docker's network churn can drop its requests."""
    if not can_shelter():
        yield None
        return
    shelter = Shelter(tmp_path_factory.mktemp("netns"))
    try:
        yield shelter
    finally:
        shelter.close()


@pytest.fixture(scope="session")
def chromium(shelter: Shelter | None) -> Iterator[Browser]:
    """The system Chromium, launched headless by Playwright (in its own namespace if it can)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("Playwright is not installed", INSTALL_PLAYWRIGHT)
    executable = require_chromium()
    if shelter is not None:
        executable = shelter.wrap(executable)
    playwright = sync_playwright().start()
    PlaywrightLoop.loop = asyncio.get_running_loop()
    try:
        browser = playwright.chromium.launch(executable_path=str(executable), args=CHROMIUM_ARGS)
        yield browser
        PlaywrightLoop.enter()
        browser.close()
    finally:
        PlaywrightLoop.enter()
        playwright.stop()
        PlaywrightLoop.loop = None
        PlaywrightLoop.leave()


def _server(tmp_path_factory: pytest.TempPathFactory, local_worker: bool) -> Iterator[LabServer]:
    from tests.browser.lab import LabServer

    server = LabServer(tmp_path_factory.mktemp("lab"), local_worker=local_worker)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def lab_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    """A JupyterLab server (base URL /cq-lab/, a token, temp folders), no local worker."""
    yield from _server(tmp_path_factory, local_worker=False)


@pytest.fixture(scope="session")
def lab_server_with_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    """The same with its local worker on queue ``local`` (needs a Docker engine)."""
    yield from _server(tmp_path_factory, local_worker=True)


@pytest.fixture
def lab(request: pytest.FixtureRequest, shelter: Shelter | None) -> LabServer:
    """The server a test's page talks to: with the local worker if marked ``local_worker``;
    its port reaches into Chromium's namespace."""
    name = (
        "lab_server_with_worker"
        if request.node.get_closest_marker("local_worker")
        else "lab_server"
    )
    server: LabServer = request.getfixturevalue(name)
    if shelter is not None:
        shelter.expose(server.port)
    return server


@pytest.fixture
def lab_page(request: pytest.FixtureRequest, chromium: Browser, lab: LabServer) -> Iterator[Page]:
    """A page with JupyterLab ready on a fresh workspace; screenshots itself afterwards."""
    from tests.browser.lab import load_lab, workspace_url

    context = chromium.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    # Printed (pytest shows it for a failed test): a request the browser lost, e.g. a theme
    # stylesheet under load, explains a page that never reached the state a test waits for.
    lost: list[str] = []

    def failed(request: Request) -> None:
        print(f"request failed: {request.url} ({request.failure})")
        if "ERR_NETWORK_CHANGED" in (request.failure or ""):
            lost.append(request.url)

    page.on("requestfailed", failed)
    try:
        load_lab(page, workspace_url(lab, f"t-{uuid.uuid4().hex[:12]}"), lost)
        yield page
    finally:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^\w.-]+", "_", request.node.name)
        try:
            page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))
        finally:
            context.close()
    assert not errors, f"errors in the page: {errors}"
