"""Getting a job's image onto the worker: pull it when missing, or build it from the job's spec.

Every Docker SDK call here blocks, so each runs in a thread; progress goes to the run's log as
``sys`` lines, throttled so a pull of many layers does not flood it. A build context is a URL
the job gave: the worker fetches it (an archive, or ``git`` through a :class:`~.fetch_proxy.
FetchProxy`) connecting only where its :class:`~.fetch_policy.FetchPolicy` allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..client.http import safe
from ..model.jobs import BuildSpec, canonical_json
from .context_archive import ContextError, is_archive, unpack
from .fetch_policy import FetchPolicy, FetchRefused
from .fetch_proxy import FetchProxy

#: The default ports of the schemes a git context may have.
_GIT_PORTS = {"http": 80, "https": 443, "git": 9418}
#: Where a built image is tagged: the hash of its build spec, so the same spec is built once.
BUILD_REPO = "compute-queue-build"

Log = Callable[[str], None]


class ImageError(Exception):
    """The image could not be pulled or built; the message says why."""


class _TransientPullError(ImageError):
    """A pull failed on the way to the registry (refused, reset, timed out): worth retrying."""


#: A pull that fails on the way to the registry is tried this many times in all (SPEC §6:
#: transient pull errors are retried before ``Error``), waiting ``PULL_BACKOFF * 2**n`` seconds
#: in between. Anything else (an image or tag the registry does not have, denied access) fails
#: at once.
PULL_ATTEMPTS = 4
PULL_BACKOFF = 2.0
#: What the engine says (in lower case) when the registry could not be reached or dropped the
#: connection: the errors worth retrying. Deliberately narrow: "not found" never retries.
_TRANSIENT_PULL = (
    "connection refused",
    "connection reset",
    "broken pipe",
    "i/o timeout",
    "tls handshake timeout",
    "timeout exceeded",
    "unexpected eof",
    "no route to host",
    "network is unreachable",
    "temporary failure in name resolution",
    "service unavailable",
    "bad gateway",
    "gateway timeout",
    "too many requests",
)


def _is_transient(message: str) -> bool:
    lowered = message.lower()
    return any(marker in lowered for marker in _TRANSIENT_PULL)


def _from_thread(log: Log) -> Log:
    """``log`` for the worker threads the blocking steps run in: each line is handed to the
    event loop, which owns the run's log (and is the only one that may schedule its flush).
    Lines keep their order: the thread's result reaches the loop after them."""
    loop = asyncio.get_running_loop()

    def handed_over(text: str) -> None:
        loop.call_soon_threadsafe(log, text)

    return handed_over


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
    thread_log = _from_thread(log)
    for attempt in range(1, PULL_ATTEMPTS + 1):
        log(f"pulling {image}\n")
        try:
            await asyncio.to_thread(_pull, client, repo, tag, thread_log)
            break
        except _TransientPullError as exc:
            if attempt == PULL_ATTEMPTS:
                raise ImageError(f"{exc} (tried {attempt} times)") from None
            delay = PULL_BACKOFF * 2 ** (attempt - 1)
            log(f"{exc}; retrying in {delay:g} s (attempt {attempt} of {PULL_ATTEMPTS})\n")
            await asyncio.sleep(delay)
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
    import requests.exceptions

    name = f"{repo}:{tag}" if tag else repo
    last: dict[str, str] = {}
    shown = 0.0
    try:
        for event in client.api.pull(repo, tag or None, stream=True, decode=True):
            if "error" in event:
                error = str(event["error"]).strip()
                kind = _TransientPullError if _is_transient(error) else ImageError
                raise kind(f"pull of {name} failed: {error}")
            layer, status = event.get("id", ""), event.get("status", "")
            if last.get(layer) != status or time.monotonic() - shown > 2:
                last[layer] = status
                shown = time.monotonic()
                progress = event.get("progress", "")
                log(f"pull: {layer + ': ' if layer else ''}{status} {progress}".rstrip() + "\n")
    except docker.errors.APIError as exc:
        error = str(exc.explanation or exc).strip()
        transient = exc.status_code != 404 and _is_transient(error)
        kind = _TransientPullError if transient else ImageError
        raise kind(f"pull of {name} failed: {error}") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        # The engine itself did not answer, or its stream stalled past the client's timeout.
        raise _TransientPullError(f"pull of {name} failed: {exc}") from None


async def build_image(
    client: Any, build: BuildSpec, log: Log, policy: FetchPolicy | None = None
) -> str:
    """Build (or reuse) the image of a build spec; returns its id. Build output goes to the log.
    ``policy``: where fetching the context may connect (None: anywhere)."""
    tag = build_tag(build)
    found = await asyncio.to_thread(_get, client, tag)
    if found is not None:
        log(f"reusing the image built earlier from this build spec ({tag})\n")
        return found
    thread_log = _from_thread(log)
    with tempfile.TemporaryDirectory(prefix="cq-build-") as tmp:
        context = await asyncio.to_thread(_context, build, Path(tmp), thread_log, policy)
        await asyncio.to_thread(_build, client, build, context, tag, thread_log)
    found = await asyncio.to_thread(_get, client, tag)
    if found is None:
        raise ImageError("the build finished but produced no image")
    return found


def _context(build: BuildSpec, tmp: Path, log: Log, policy: FetchPolicy | None = None) -> Path:
    """A folder holding the build context (fetched, unpacked, sub-folder chosen)."""
    root = tmp / "context"
    root.mkdir()
    if build.context:
        url, _, ref = build.context.partition("#")
        if is_archive(url):
            log(f"fetching build context {url}\n")
            try:
                unpack(url, root, policy)
            except ContextError as exc:
                raise ImageError(f"build.context: {exc}") from None
        else:
            log(f"cloning {url}{' at ' + ref if ref else ''}\n")
            _clone(url, ref, root, policy)
    folder = root / build.build_context if build.build_context else root
    if not folder.is_dir():
        raise ImageError(
            f"build.buildContext: {build.build_context!r} is not a folder of the context"
        )
    if build.dockerfile:
        (folder / (build.filename or "Dockerfile")).write_text(build.dockerfile)
    return folder


def _clone(url: str, ref: str, dest: Path, policy: FetchPolicy | None = None) -> None:
    if shutil.which("git") is None:
        raise ImageError("build.context: a git context needs git on the worker (apt install git)")
    with contextlib.ExitStack() as stack:
        proxy = stack.enter_context(FetchProxy(policy)) if policy is not None else None
        _git_clone(url, ref, dest, proxy)


def _git_clone(url: str, ref: str, dest: Path, proxy: FetchProxy | None) -> None:
    # Never ask for a login on a terminal: a context needing one fails instead of hanging.
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true"}
    git = ["git"]
    if proxy is not None:
        env = proxy.git_environment(env, dest.parent)
        git += proxy.git_options(dest.parent)
    command = [*git, "clone", "--quiet", "--depth", "1"]
    if ref:
        command += ["--branch", ref]
    done = subprocess.run(
        [*command, url, str(dest)], capture_output=True, text=True, timeout=600, env=env
    )
    if proxy is not None and proxy.refused:
        raise ImageError(f"build.context: {_refused(url, proxy.refused[0])}")
    if done.returncode != 0:
        # A commit hash cannot be cloned by --branch, and a plain ("dumb") HTTP server cannot
        # give a shallow clone at all: fetch the whole history (and check the ref out).
        shutil.rmtree(dest)
        dest.mkdir()
        done = subprocess.run(
            [*git, "clone", "--quiet", url, str(dest)],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        if done.returncode == 0 and ref:
            done = subprocess.run(
                ["git", "-C", str(dest), "checkout", "--quiet", ref],
                capture_output=True,
                text=True,
                timeout=120,
            )
    if proxy is not None and proxy.refused:
        raise ImageError(f"build.context: {_refused(url, proxy.refused[0])}")
    if done.returncode != 0:
        raise ImageError(f"build.context: git could not fetch {url}: {done.stderr.strip()}")


def _refused(url: str, refused: FetchRefused) -> str:
    """What git was refused, named by the context's URL when it was the context's own host."""
    split = urlsplit(url)
    own = {f"{split.hostname}:{split.port or _GIT_PORTS.get(split.scheme, 0)}", safe(url)}
    if refused.url in own or (refused.url or "").startswith(f"{safe(url)}/"):
        return f"the worker does not fetch {safe(url)}: {refused.reason}"
    return f"{safe(url)} led to {refused.url}, which the worker does not fetch: {refused.reason}"


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
