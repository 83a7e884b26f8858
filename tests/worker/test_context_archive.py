"""Build contexts given as archive URLs are fetched and unpacked within limits: a job's archive
cannot take the worker's memory or disk (worker/context_archive.py).

The archives are served by a real HTTP server on loopback (no policy: these tests are about the
sizes, tests/worker/test_fetch_policy.py about where a worker may connect); the limits are made
small so that the archives can be.
"""

from __future__ import annotations

import gzip
import http.server
import io
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from jupyter_compute_queue.worker import context_archive
from jupyter_compute_queue.worker.context_archive import ContextError, unpack


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, folder) of a static HTTP server on loopback."""
    folder = tmp_path / "site"
    folder.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(folder), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", folder
    finally:
        server.shutdown()
        server.server_close()


def tar_gz(files: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue())


def zipped(files: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return raw.getvalue()


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    folder = tmp_path / "build" / "context"
    folder.mkdir(parents=True)
    return folder


def test_an_archive_unpacks_and_its_top_folder_is_unwrapped(
    site: tuple[str, Path], dest: Path
) -> None:
    url, folder = site
    (folder / "a.tar.gz").write_bytes(tar_gz({"repo-main/Dockerfile": b"FROM x\n"}))
    (folder / "b.zip").write_bytes(zipped({"app/run.sh": b"echo hi\n", "README": b"r"}))
    unpack(f"{url}/a.tar.gz", dest)
    assert (dest / "Dockerfile").read_bytes() == b"FROM x\n"
    other = dest.parent / "other"
    other.mkdir()
    unpack(f"{url}/b.zip?sig=secret", other)
    assert (other / "app" / "run.sh").read_bytes() == b"echo hi\n"


def test_a_download_stops_at_its_limit(
    site: tuple[str, Path], dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, folder = site
    monkeypatch.setattr(context_archive, "MAX_ARCHIVE_BYTES", 64 * 1024)
    (folder / "big.tar").write_bytes(b"\0" * (1024 * 1024))
    with pytest.raises(
        ContextError, match=r"big\.tar is larger than 0\.0625 MiB, the most a worker fetches"
    ):
        unpack(f"{url}/big.tar", dest)
    assert list(dest.parent.iterdir()) == [dest]  # the partial download went with its folder
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_a_small_archive_that_unpacks_to_a_lot_is_refused_before_writing(
    site: tuple[str, Path], dest: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    url, folder = site
    monkeypatch.setattr(context_archive, "MAX_UNPACKED_BYTES", 1024 * 1024)
    files = {"ok.txt": b"fine", "zeros.bin": b"\0" * (8 * 1024 * 1024)}
    data = tar_gz(files) if kind == "tar.gz" else zipped(files)
    assert len(data) < 64 * 1024  # compresses to almost nothing
    (folder / f"bomb.{kind}").write_bytes(data)
    with pytest.raises(ContextError, match=r"bomb\.[a-z.]+ unpacks to more than 1 MiB") as refused:
        unpack(f"{url}/bomb.{kind}?token=x", dest)
    assert "token" not in str(refused.value)  # a presigned URL's query stays out
    assert list(dest.iterdir()) == []  # nothing was written


def test_too_many_entries_are_refused(
    site: tuple[str, Path], dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, folder = site
    monkeypatch.setattr(context_archive, "MAX_MEMBERS", 50)
    (folder / "many.zip").write_bytes(zipped({f"f{i}": b"" for i in range(51)}))
    with pytest.raises(ContextError, match="more than 50 entries"):
        unpack(f"{url}/many.zip", dest)
    assert list(dest.iterdir()) == []


def test_members_that_escape_or_garbage_are_refused(site: tuple[str, Path], dest: Path) -> None:
    url, folder = site
    (folder / "slip.zip").write_bytes(zipped({"../../outside.txt": b"x"}))
    with pytest.raises(ContextError, match="escapes the context"):
        unpack(f"{url}/slip.zip", dest)
    assert not (dest.parent.parent / "outside.txt").exists()
    (folder / "slip.tar.gz").write_bytes(tar_gz({"../outside.txt": b"x"}))
    with pytest.raises(ContextError, match="is not a readable archive"):
        unpack(f"{url}/slip.tar.gz", dest)  # tarfile's "data" filter refuses it
    assert not (dest.parent / "outside.txt").exists()
    (folder / "junk.tgz").write_bytes(b"not an archive")
    with pytest.raises(ContextError, match=r"junk\.tgz is not a readable archive"):
        unpack(f"{url}/junk.tgz", dest)
