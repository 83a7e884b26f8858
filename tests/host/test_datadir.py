"""One host process per data dir; a second one takes a folder of its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jupyter_compute_queue.host.datadir import DataDirLocked, acquire, filesystem_type


def run(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )


def test_second_owner_gets_its_own_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = acquire(tmp_path / "cq")
    # A second process (a lock is per open file, so a real second process shows it best).
    script = (
        "import sys; from jupyter_compute_queue.host.datadir import acquire;"
        f"print(acquire({str(tmp_path / 'cq')!r}).path)"
    )
    out = run(script)
    assert out.stdout.strip() == str(tmp_path / "cq-2")
    assert "in use by pid" in out.stderr
    first.release()
    again = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert again.stdout.strip() == str(tmp_path / "cq")


def test_all_taken(tmp_path: Path) -> None:
    held = [acquire(tmp_path / "cq", attempts=1)]
    script = (
        "from jupyter_compute_queue.host.datadir import acquire;"
        f"acquire({str(tmp_path / 'cq')!r}, attempts=1)"
    )
    out = run(script)
    assert out.returncode != 0 and DataDirLocked.__name__ in out.stderr
    held[0].release()


def test_filesystem_type_of_a_local_folder(tmp_path: Path) -> None:
    if not Path("/proc/mounts").exists():
        pytest.skip("no /proc/mounts on this system")
    assert filesystem_type(tmp_path) not in (None, "nfs", "nfs4", "cifs")


def test_host_secret_is_made_once_and_private(tmp_path: Path) -> None:
    from jupyter_compute_queue.host.datadir import host_secret

    first = host_secret(tmp_path / "d")
    assert len(first) == 32 and host_secret(tmp_path / "d") == first
    assert ((tmp_path / "d" / "secret").stat().st_mode & 0o777) == 0o600
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["secret"]
