"""Getting a job's image onto the worker: pull it when missing, or build it from the job's spec.

Every Docker SDK call here blocks, so each runs in a thread; progress goes to the run's log as
``sys`` lines, throttled so a pull of many layers does not flood it.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..jobs import BuildSpec, canonical_json

#: Where a built image is tagged: the hash of its build spec, so the same spec is built once.
BUILD_REPO = "compute-queue-build"

Log = Callable[[str], None]


class ImageError(Exception):
    """The image could not be pulled or built; the message says why."""


def build_tag(build: BuildSpec) -> str:
    """The tag of the image a build spec gives."""
    spec = build.model_dump(mode="json", by_alias=True, exclude_none=True)
    return f"{BUILD_REPO}:{hashlib.sha256(canonical_json(spec)).hexdigest()[:40]}"


async def ensure_image(client: Any, image: str, log: Log) -> str:
    """Pull ``image`` unless present; returns its id (the digest the run record keeps)."""
    found = await asyncio.to_thread(_get, client, image)
    if found is not None:
        return found
    repo, tag = _split(image)
    log(f"pulling {image}\n")
    await asyncio.to_thread(_pull, client, repo, tag, log)
    found = await asyncio.to_thread(_get, client, image)
    if found is None:
        raise ImageError(f"pulled {image} but the engine does not list it")
    return found


def _get(client: Any, image: str) -> str | None:
    import docker.errors

    try:
        return str(client.images.get(image).id)
    except docker.errors.ImageNotFound:
        return None


def _split(image: str) -> tuple[str, str]:
    if "@" in image:
        return image, ""  # a digest names one image: pull exactly that
    name, _, tag = image.rpartition(":")
    if name and "/" not in tag:
        return name, tag
    return image, "latest"


def _pull(client: Any, repo: str, tag: str, log: Log) -> None:
    import docker.errors

    last: dict[str, str] = {}
    shown = 0.0
    try:
        for event in client.api.pull(repo, tag or None, stream=True, decode=True):
            if "error" in event:
                raise ImageError(f"pull of {repo}:{tag} failed: {event['error']}")
            layer, status = event.get("id", ""), event.get("status", "")
            if last.get(layer) != status or time.monotonic() - shown > 2:
                last[layer] = status
                shown = time.monotonic()
                progress = event.get("progress", "")
                log(f"pull: {layer + ': ' if layer else ''}{status} {progress}".rstrip() + "\n")
    except docker.errors.APIError as exc:
        raise ImageError(f"pull of {repo}:{tag} failed: {exc.explanation or exc}") from None


async def build_image(client: Any, build: BuildSpec, log: Log) -> str:
    """Build (or reuse) the image of a build spec; returns its id. Build output goes to the log."""
    tag = build_tag(build)
    found = await asyncio.to_thread(_get, client, tag)
    if found is not None:
        log(f"reusing the image built earlier from this build spec ({tag})\n")
        return found
    with tempfile.TemporaryDirectory(prefix="cq-build-") as tmp:
        context = await asyncio.to_thread(_context, build, Path(tmp), log)
        await asyncio.to_thread(_build, client, build, context, tag, log)
    found = await asyncio.to_thread(_get, client, tag)
    if found is None:
        raise ImageError("the build finished but produced no image")
    return found


def _context(build: BuildSpec, tmp: Path, log: Log) -> Path:
    """A folder holding the build context (fetched, unpacked, sub-folder chosen)."""
    root = tmp / "context"
    root.mkdir()
    if build.context:
        url, _, ref = build.context.partition("#")
        if _is_archive(url):
            log(f"fetching build context {url}\n")
            _unpack(url, root)
        else:
            log(f"cloning {url}{' at ' + ref if ref else ''}\n")
            _clone(url, ref, root)
    folder = root / build.build_context if build.build_context else root
    if not folder.is_dir():
        raise ImageError(
            f"build.buildContext: {build.build_context!r} is not a folder of the context"
        )
    if build.dockerfile:
        (folder / (build.filename or "Dockerfile")).write_text(build.dockerfile)
    return folder


def _is_archive(url: str) -> bool:
    path = url.split("?", 1)[0].lower()
    return path.endswith((".tar.gz", ".tgz", ".tar", ".zip"))


def _unpack(url: str, dest: Path) -> None:
    with urllib.request.urlopen(url, timeout=120) as response:  # http(s): checked by the job model
        data = response.read()
    try:
        if url.split("?", 1)[0].lower().endswith(".zip"):
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                for member in archive.namelist():
                    _safe_member(dest, member)
                archive.extractall(dest)
        else:
            with tarfile.open(fileobj=io.BytesIO(data)) as archive:
                archive.extractall(dest, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile) as exc:
        raise ImageError(f"build.context: {url} is not a readable archive: {exc}") from None
    _strip_single_folder(dest)


def _safe_member(dest: Path, member: str) -> None:
    target = (dest / member).resolve()
    if not str(target).startswith(str(dest.resolve())):
        raise ImageError(f"build.context: the archive member {member!r} escapes the context")


def _strip_single_folder(dest: Path) -> None:
    """GitHub-style archives wrap everything in one top folder: use its inside as the context."""
    entries = list(dest.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        inner = entries[0]
        for child in inner.iterdir():
            shutil.move(str(child), dest / child.name)
        inner.rmdir()


def _clone(url: str, ref: str, dest: Path) -> None:
    if shutil.which("git") is None:
        raise ImageError("build.context: a git context needs git on the worker (apt install git)")
    command = ["git", "clone", "--quiet", "--depth", "1"]
    if ref:
        command += ["--branch", ref]
    done = subprocess.run([*command, url, str(dest)], capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and ref:
        # A commit hash cannot be cloned by --branch: fetch the whole history and check it out.
        shutil.rmtree(dest)
        dest.mkdir()
        done = subprocess.run(
            ["git", "clone", "--quiet", url, str(dest)], capture_output=True, text=True, timeout=600
        )
        if done.returncode == 0:
            done = subprocess.run(
                ["git", "-C", str(dest), "checkout", "--quiet", ref],
                capture_output=True,
                text=True,
                timeout=120,
            )
    if done.returncode != 0:
        raise ImageError(f"build.context: git could not fetch {url}: {done.stderr.strip()}")


def _build(client: Any, build: BuildSpec, context: Path, tag: str, log: Log) -> None:
    import docker.errors

    try:
        stream: Iterator[dict[str, Any]] = client.api.build(
            path=str(context),
            dockerfile=build.filename or "Dockerfile",
            tag=tag,
            rm=True,
            forcerm=True,
            decode=True,
            buildargs=build.build_args or None,
            target=build.target,
            platform=build.platform,
        )
        for event in stream:
            if "error" in event:
                raise ImageError(f"build failed: {event['error'].strip()}")
            text = event.get("stream") or event.get("status")
            if text:
                log(text if text.endswith("\n") else text + "\n")
    except docker.errors.APIError as exc:
        raise ImageError(f"build failed: {exc.explanation or exc}") from None
