"""How the worker gets a job's image (SPEC §2 ``build``, §6 Images), against the real engine.

Nothing is pulled from a public registry: pulls go to a loopback ``docker-registry`` (the
``registry`` fixture), builds start ``FROM`` the local test images, and build contexts (archives,
git repositories) are served by a static HTTP server on 127.0.0.1 that the worker, not the
engine, fetches from.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server
import io
import subprocess
import tarfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from jupyter_compute_queue.model.jobs import parse_definition
from jupyter_compute_queue.worker import images
from jupyter_compute_queue.worker.egress import Allowed, parse_allowed
from tests.docker_env import docker_client, free_loopback_port

from .conftest import Fetch, StartWorker, run_job, submit, unique_id, wait_result

BUILT_MARK = "reusing the image built earlier"


# --- helpers ------------------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def serve_dir(tmp_path: Path) -> Iterator[Callable[[Path], str]]:
    """``serve_dir(folder)`` → ``http://127.0.0.1:PORT``: a static file server in a thread."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def serve(folder: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def opened(url: str) -> tuple[Allowed, ...]:
    """``--allow-egress`` for the loopback server of ``url``: the worker fetches a build
    context only where its jobs may connect (docs/worker.md, Isolation)."""
    return (parse_allowed(f"127.0.0.1:{urlsplit(url).port}"),)


@pytest.fixture
def built(docker_engine: Any) -> Iterator[Callable[[dict[str, Any]], dict[str, Any]]]:
    """``built(build_spec)`` → the spec, remembering the image tag it gives; removed at the end.

    Each test's Dockerfiles carry a fresh nonce, so an image left by an earlier run of the suite
    can never be "reused" by this one.
    """
    tags: list[str] = []

    def remember(build: dict[str, Any]) -> dict[str, Any]:
        definition = parse_definition({"build": build})
        assert definition.build is not None
        tags.append(images.build_tag(definition.build))
        return build

    yield remember
    for tag in tags:
        with contextlib.suppress(Exception):
            docker_engine.images.remove(tag, force=True)


def nonce() -> str:
    """A Dockerfile comment that makes the build spec (so its tag) unique to this test run."""
    return f"# test run {uuid.uuid4().hex}\n"


def step_lines(logs: str) -> list[str]:
    """The legacy builder's step lines ("Step 2/3 : RUN …")."""
    return [line for line in logs.splitlines() if line.startswith("Step ")]


def push_busybox(busybox: str, registry: str, name: str) -> str:
    """Push the busybox test image to the loopback registry as ``name``; no local tag is kept."""
    client = docker_client()
    repo, tag = f"{registry}/{name}".rsplit(":", 1)
    client.images.get(busybox).tag(repo, tag)
    try:
        for event in client.api.push(repo, tag, stream=True, decode=True):
            assert "error" not in event, event
    finally:
        client.images.remove(f"{repo}:{tag}")
    with pytest.raises(Exception, match="No such image"):
        client.images.get(f"{repo}:{tag}")
    return f"{repo}:{tag}"


def remove_image(reference: str) -> None:
    with contextlib.suppress(Exception):
        docker_client().images.remove(reference)


def git(*args: str, cwd: Path) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


# --- pull ---------------------------------------------------------------------------------


async def test_pull_from_a_registry(
    fetch: Fetch, start_worker: StartWorker, test_images: Any, registry: str
) -> None:
    image = await asyncio.to_thread(push_busybox, test_images.busybox, registry, "cq/busybox:pull")
    try:
        await start_worker(unique_id())
        result, logs = await run_job(fetch, {"image": image, "command": "echo pulled-ok"})
        assert result["reason"] == "Success", (result, logs)
        assert "pulled-ok" in logs
        assert f"pulling {image}" in logs
        assert "pull: " in logs and "Digest: sha256:" in logs, logs  # the engine's progress
        # The record keeps the id of the image the container ran (the pushed busybox image).
        expected = docker_client().images.get(test_images.busybox).id
        assert result["imageDigest"] == expected

        # Present now: a second job does not pull again.
        result, logs = await run_job(fetch, {"image": image, "command": "echo again"})
        assert result["reason"] == "Success" and "again" in logs
        assert "pulling" not in logs and result["imageDigest"] == expected
    finally:
        remove_image(image)


async def test_pull_of_a_missing_image_fails_at_once(
    fetch: Fetch,
    start_worker: StartWorker,
    test_images: Any,
    registry: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(images, "PULL_BACKOFF", 5.0)  # a retry would show in the time taken
    await start_worker(unique_id())
    image = f"{registry}/cq/no-such-image:1"
    started = asyncio.get_running_loop().time()
    result, logs = await run_job(fetch, {"image": image, "command": "true"})
    assert result["reason"] == "Error", (result, logs)
    assert result["message"].startswith(f"pull of {image} failed:"), result
    assert "not found" in result["message"] or "unknown" in result["message"], result
    # "Not found" is no transient error: not retried.
    assert "retrying" not in logs
    assert asyncio.get_running_loop().time() - started < 5.0
    assert not result.get("imageDigest")


async def test_pull_from_an_unreachable_registry_is_retried_then_fails(
    fetch: Fetch, start_worker: StartWorker, test_images: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(images, "PULL_BACKOFF", 0.05)
    await start_worker(unique_id())
    image = f"localhost:{free_loopback_port()}/cq/busybox:1"  # nothing listens there
    result, logs = await run_job(fetch, {"image": image, "command": "true"})
    assert result["reason"] == "Error", (result, logs)
    message = result["message"]
    assert message.startswith(f"pull of {image} failed:") and "connection refused" in message
    assert f"(tried {images.PULL_ATTEMPTS} times)" in message
    assert logs.count("retrying in") == images.PULL_ATTEMPTS - 1, logs
    assert logs.count(f"pulling {image}") == images.PULL_ATTEMPTS


async def _forward(upstream_port: int, reader: Any, writer: Any) -> None:
    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)

    async def pipe(source: Any, sink: Any) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        finally:
            sink.close()

    await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)


async def test_a_registry_that_comes_back_is_pulled_from_after_a_retry(
    fetch: Fetch,
    start_worker: StartWorker,
    test_images: Any,
    registry: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first attempt is refused; the registry is reachable by the next one."""
    monkeypatch.setattr(images, "PULL_BACKOFF", 0.5)
    await asyncio.to_thread(push_busybox, test_images.busybox, registry, "cq/busybox:late")
    port = free_loopback_port()
    image = f"localhost:{port}/cq/busybox:late"  # a forwarder to the registry, started late
    await start_worker(unique_id())
    answer = await submit(fetch, "q", {"image": image, "command": "echo came-back"})
    deadline = asyncio.get_running_loop().time() + 20
    while "retrying in" not in (await fetch("q", "q", "j", answer["jobId"], "logs")).body.decode():
        assert asyncio.get_running_loop().time() < deadline, "no retry was logged"
        await asyncio.sleep(0.02)
    upstream = int(registry.rsplit(":", 1)[1])
    server = await asyncio.start_server(
        functools.partial(_forward, upstream), "127.0.0.1", port, reuse_address=True
    )
    try:
        result = await wait_result(fetch, "q", answer["jobId"], 60)
        logs = (await fetch("q", "q", "j", answer["jobId"], "logs")).body.decode()
        assert result["reason"] == "Success", (result, logs)
        assert "came-back" in logs and "connection refused" in logs
    finally:
        server.close()
        remove_image(image)


# --- build from Dockerfile text -------------------------------------------------------------


async def test_build_from_dockerfile_text_and_reuse(
    fetch: Fetch, start_worker: StartWorker, test_images: Any, built: Any
) -> None:
    build = built({"dockerfile": f"FROM {test_images.busybox}\n{nonce()}RUN echo built > /built\n"})
    await start_worker(unique_id())
    result, logs = await run_job(fetch, {"build": build, "command": "cat /built"})
    assert result["reason"] == "Success", (result, logs)
    assert "built" in logs.splitlines()
    steps = step_lines(logs)
    assert any("RUN echo built > /built" in line for line in steps), logs  # streamed build output
    assert BUILT_MARK not in logs
    digest = result["imageDigest"]
    assert digest and digest.startswith("sha256:")

    # Another job (another command) with the same build spec: no build, the same image.
    again, logs = await run_job(fetch, {"build": build, "command": "cat /built /built"})
    assert again["reason"] == "Success", (again, logs)
    assert logs.count("built\n") >= 2
    assert step_lines(logs) == [] and BUILT_MARK in logs
    assert again["imageDigest"] == digest


async def test_build_args_as_a_map_and_as_the_seeds_list(
    fetch: Fetch, start_worker: StartWorker, test_images: Any, built: Any
) -> None:
    dockerfile = (
        f"FROM {test_images.busybox}\n{nonce()}ARG A\nARG B=b-default\n"
        'RUN echo "A=$A B=$B" > /args\n'
    )
    await start_worker(unique_id())
    as_map = built({"dockerfile": dockerfile, "buildArgs": {"A": "from-map", "B": "also"}})
    result, logs = await run_job(fetch, {"build": as_map, "command": "cat /args"})
    assert result["reason"] == "Success", (result, logs)
    assert "A=from-map B=also" in logs.splitlines()

    as_list = built({"dockerfile": dockerfile, "buildArgs": ["A=1"]})
    result, logs = await run_job(fetch, {"build": as_list, "command": "cat /args"})
    assert result["reason"] == "Success", (result, logs)
    assert "A=1 B=b-default" in logs.splitlines()


async def test_target_picks_a_stage(
    fetch: Fetch, start_worker: StartWorker, test_images: Any, built: Any
) -> None:
    dockerfile = (
        f"FROM {test_images.busybox} AS first\n{nonce()}RUN echo stage-first > /stage\n"
        f"FROM {test_images.busybox} AS second\nRUN echo stage-second > /stage\n"
    )
    await start_worker(unique_id())
    for target, expected in [("first", "stage-first"), (None, "stage-second")]:
        build = built({"dockerfile": dockerfile, **({"target": target} if target else {})})
        result, logs = await run_job(fetch, {"build": build, "command": "cat /stage"})
        assert result["reason"] == "Success", (result, logs)
        assert expected in logs.splitlines(), (target, logs)


async def test_a_failing_build_is_an_error_with_its_output_in_the_logs(
    fetch: Fetch, start_worker: StartWorker, test_images: Any, built: Any
) -> None:
    build = built(
        {"dockerfile": f"FROM {test_images.busybox}\n{nonce()}RUN echo before-fail && false\n"}
    )
    await start_worker(unique_id())
    result, logs = await run_job(fetch, {"build": build, "command": "true"})
    assert result["reason"] == "Error", (result, logs)
    assert result["message"].startswith("build failed:"), result
    assert "non-zero code" in result["message"], result
    assert any("RUN echo before-fail" in line for line in step_lines(logs)), logs
    assert "before-fail" in logs.splitlines()  # the RUN's own output
    # Nothing was tagged: the next job with the spec builds (and fails) again.
    spec = parse_definition({"build": build}).build
    assert spec is not None
    with pytest.raises(Exception, match="No such image"):
        docker_client().images.get(images.build_tag(spec))


# --- build from a fetched context -----------------------------------------------------------


def _tar_gz(files: dict[str, str]) -> bytes:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as archive:
        for name, text in files.items():
            raw = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(raw))
    return data.getvalue()


async def test_build_from_a_tar_gz_context(
    fetch: Fetch,
    start_worker: StartWorker,
    test_images: Any,
    built: Any,
    serve_dir: Any,
    tmp_path: Path,
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    # A GitHub-style archive: everything under one top folder, the build in a sub-folder.
    (site / "ctx.tar.gz").write_bytes(
        _tar_gz(
            {
                "project-main/README": "not part of the build\n",
                "project-main/Dockerfile": "FROM scratch\n",  # the default name: not used
                "project-main/app/Dockerfile.job": (
                    f"FROM {test_images.busybox}\n{nonce()}COPY hello.txt /hello.txt\n"
                ),
                "project-main/app/hello.txt": "hello from the context\n",
            }
        )
    )
    url = serve_dir(site)
    build = built(
        {"context": f"{url}/ctx.tar.gz", "buildContext": "app", "filename": "Dockerfile.job"}
    )
    await start_worker(unique_id(), allow_egress=opened(url))
    result, logs = await run_job(fetch, {"build": build, "command": "cat /hello.txt"})
    assert result["reason"] == "Success", (result, logs)
    assert "hello from the context" in logs.splitlines()
    assert f"fetching build context {url}/ctx.tar.gz" in logs
    assert any("COPY hello.txt /hello.txt" in line for line in step_lines(logs)), logs

    # A sub-folder the archive does not have names the field.
    missing = built({"context": f"{url}/ctx.tar.gz", "buildContext": "nope"})
    result, logs = await run_job(fetch, {"build": missing, "command": "true"})
    assert result["reason"] == "Error" and "build.buildContext" in result["message"], result


@pytest.fixture
def git_site(tmp_path: Path, serve_dir: Any, test_images: Any) -> str:
    """A repository with ``docker/Dockerfile``: tag ``v1`` says v1, the branch head says v2;
    served as a bare repository over plain ("dumb") HTTP. Returns the repository's URL."""
    work = tmp_path / "repo"
    (work / "docker").mkdir(parents=True)
    git("init", "--quiet", "--initial-branch=main", cwd=work)
    (work / "docker" / "Dockerfile").write_text(
        f"FROM {test_images.busybox}\n{nonce()}COPY message.txt /message.txt\n"
    )
    for version in ("v1", "v2"):
        (work / "docker" / "message.txt").write_text(f"message {version}\n")
        git("add", "-A", cwd=work)
        git("commit", "--quiet", "-m", version, cwd=work)
        if version == "v1":
            git("tag", "v1", cwd=work)
    site = tmp_path / "git-site"
    site.mkdir()
    git("clone", "--quiet", "--bare", str(work), str(site / "repo.git"), cwd=tmp_path)
    git("update-server-info", cwd=site / "repo.git")
    return f"{serve_dir(site)}/repo.git"


async def test_build_from_a_git_repository_over_http(
    fetch: Fetch, start_worker: StartWorker, built: Any, git_site: str
) -> None:
    await start_worker(unique_id(), allow_egress=opened(git_site))
    for ref, expected in [("#v1", "message v1"), ("", "message v2")]:
        build = built({"context": git_site + ref, "buildContext": "docker"})
        result, logs = await run_job(fetch, {"build": build, "command": "cat /message.txt"})
        assert result["reason"] == "Success", (ref, result["message"], logs)
        assert expected in logs.splitlines(), (ref, logs)
        assert f"cloning {git_site}" in logs


async def test_a_bad_git_ref_is_an_error_naming_git(
    fetch: Fetch, start_worker: StartWorker, built: Any, git_site: str
) -> None:
    await start_worker(unique_id(), allow_egress=opened(git_site))
    build = built({"context": git_site + "#no-such-ref", "buildContext": "docker"})
    result, logs = await run_job(fetch, {"build": build, "command": "true"})
    assert result["reason"] == "Error", (result, logs)
    assert "git" in result["message"] and git_site in result["message"], result
    assert "no-such-ref" in result["message"], result
