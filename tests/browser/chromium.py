"""Chromium and Playwright for the browser tests: where they are, and what a missing one does.

Chromium is Debian's (``bash scripts/install.sh --tests`` installs it as root); Playwright is in
the test extra; ``playwright install`` (a browser download) is never run. Without either the
tests skip, saying what is missing and how to get it, except under ``CI=true``, where a skipped
browser test would hide a broken setup: there they fail.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest

from tests.docker_env import in_ci

CHROMIUM = Path(os.environ.get("COMPUTE_QUEUE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
INSTALL_CHROMIUM = (
    "run bash scripts/install.sh --tests as root, or "
    "sudo apt-get install -y --no-install-recommends chromium"
)
INSTALL_PLAYWRIGHT = "run bash scripts/install.sh (Playwright is in the test extra)"


def missing(what: str, fix: str) -> NoReturn:
    """Skips (the test, or the module being imported), saying what is missing and how to get
    it; fails under CI=true."""
    message = f"{what}; {fix}"
    if in_ci():
        pytest.fail(f"CI=true, so browser tests must run: {message}", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def require_chromium() -> Path:
    if not os.access(CHROMIUM, os.X_OK):
        missing(f"no Chromium at {CHROMIUM}", INSTALL_CHROMIUM)
    return CHROMIUM
