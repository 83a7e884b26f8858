"""The layering contract (pyproject.toml [tool.importlinter], docs/design.md "Layout") holds for
the package, and bites: a copy of the package with one bad import breaks the contract it crosses.

scripts/test.sh runs the same check on the tree; this shows that the check would fail.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports over the package in ``tree`` (found first on the path), with our contracts."""
    return subprocess.run(
        [str(LINT), "--no-cache", "--config", str(ROOT / "pyproject.toml")],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    shutil.copytree(
        ROOT / "jupyter_compute_queue",
        tmp_path / "jupyter_compute_queue",
        ignore=shutil.ignore_patterns("__pycache__", "labextension", "static"),
    )
    return tmp_path


def add_line(tree: Path, module: str, line: str) -> None:
    path = tree / "jupyter_compute_queue" / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")


def test_the_package_keeps_every_contract(copy: Path) -> None:
    done = lint(copy)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("worker/agent.py", "from ..host import service", "worker/ knows model/, wire/"),
        ("host/service.py", "from ..server import files", "host/ holds the rules and the state"),
        ("client/job.py", "from ..host.store import base", "client/ talks to a host over HTTP"),
        ("model/units.py", "import sqlite3", "model/ is what every side shares"),
        ("notebook/magic.py", "from ..worker import runtime", "notebook/ and the job commands"),
    ],
)
def test_an_import_across_a_line_breaks_its_contract(
    copy: Path, module: str, line: str, broken: str
) -> None:
    add_line(copy, module, line)
    done = lint(copy)
    assert done.returncode != 0
    lines = [x for x in done.stdout.splitlines() if x.startswith(broken)]
    assert lines and "BROKEN" in lines[0], done.stdout


def test_a_circle_breaks_the_acyclic_contract(copy: Path) -> None:
    # host/limits.py imports host/metrics.py; the other way round makes a circle, and nothing else
    add_line(copy, "host/metrics.py", "from . import limits as _limits")
    done = lint(copy)
    assert done.returncode != 0
    assert "No import circle between modules" in done.stdout
    assert "No cycles are allowed in jupyter_compute_queue.host." in done.stdout, done.stdout
