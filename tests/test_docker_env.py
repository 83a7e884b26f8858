"""The Docker test environment works: engine, local images, loopback registry."""

from __future__ import annotations

import contextlib
import uuid

import docker
import pytest

from tests.docker_env import MIN_API_VERSION, ImageNames, api_version_tuple


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def test_engine_answers_with_a_supported_api(docker_engine: docker.DockerClient) -> None:
    server = docker_engine.version()
    assert api_version_tuple(server["ApiVersion"]) >= MIN_API_VERSION
    # Negotiated, not pinned: the client speaks the engine's version, not the SDK's newest.
    negotiated = api_version_tuple(docker_engine.api.api_version)
    assert MIN_API_VERSION <= negotiated <= api_version_tuple(server["ApiVersion"])


def test_busybox_image_runs_and_is_removed(
    docker_engine: docker.DockerClient, test_images: ImageNames
) -> None:
    name = unique("cq-test-echo")
    output = docker_engine.containers.run(
        test_images.busybox, ["echo", "hi"], name=name, init=True, remove=True
    )
    assert output == b"hi\n"
    with pytest.raises(docker.errors.NotFound):
        docker_engine.containers.get(name)


def test_busybox_image_has_users_and_a_shared_tmp(
    docker_engine: docker.DockerClient, test_images: ImageNames
) -> None:
    script = "touch /tmp/x && id -un && grep -c . /etc/passwd && stat -c %a /tmp"
    output = docker_engine.containers.run(
        test_images.busybox, ["sh", "-c", script], user="nobody", init=True, remove=True
    )
    assert output.decode().split() == ["nobody", "2", "1777"]


def test_python_image_has_the_standard_library(
    docker_engine: docker.DockerClient, test_images: ImageNames
) -> None:
    output = docker_engine.containers.run(
        test_images.python,
        ["python3", "-c", "import json, asyncio, csv, zlib; print('ok')"],
        user="65534:65534",
        init=True,
        remove=True,
    )
    assert output == b"ok\n"


def test_push_to_and_pull_from_the_loopback_registry(
    docker_engine: docker.DockerClient, test_images: ImageNames, registry: str
) -> None:
    original = docker_engine.images.get(test_images.busybox)
    repository, tag = f"{registry}/cq-test/busybox", unique("pushed")
    reference = f"{repository}:{tag}"
    assert original.tag(repository, tag)
    try:
        events = list(docker_engine.images.push(repository, tag, stream=True, decode=True))
        errors = [event for event in events if "error" in event]
        assert not errors, errors
        docker_engine.images.remove(reference)
        with pytest.raises(docker.errors.ImageNotFound):
            docker_engine.images.get(reference)

        pulled = docker_engine.images.pull(repository, tag=tag)
        assert pulled.id == original.id
        output = docker_engine.containers.run(reference, ["echo", "pulled"], init=True, remove=True)
        assert output == b"pulled\n"
    finally:
        with contextlib.suppress(docker.errors.ImageNotFound):
            docker_engine.images.remove(reference)
