"""Callbacks (SPEC §11): a real service on a real SQLite store, POSTing to a real receiver on
loopback; retries, restarts and the public-mode address checks."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from jupyter_compute_queue.host.blobs.local import LocalBlobStore
from jupyter_compute_queue.host.callbacks import PublicResolver, RefusedAddress, is_public_address
from jupyter_compute_queue.host.logs import LogStore
from jupyter_compute_queue.host.service import BadRequest, QueueService, ServiceConfig
from jupyter_compute_queue.host.store.base import Outcome
from jupyter_compute_queue.host.store.sqlite import SqliteStore
from jupyter_compute_queue.model.runs import Reason

from ..conftest import USER, connect
from ..receiver import Receiver, receiving

JOB = {"image": "busybox", "command": "echo hi"}

Make = Callable[..., QueueService]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with receiving() as r:
        yield r


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Make]:
    """Services on one data dir (real clock); each is opened and started, and stopped at the
    end if the test did not."""
    made: list[QueueService] = []

    def new(**config: Any) -> QueueService:
        root = tmp_path / "host"
        service = QueueService(
            SqliteStore(root / "state.sqlite"),
            LogStore(root / "logs"),
            LocalBlobStore(root / "blobs"),
            ServiceConfig(**{"callback_backoff": 0.05, **config}),
        )
        made.append(service)
        return service

    yield new
    for service in made:
        if not service.stopped:
            await stop(service)


async def start(service: QueueService) -> QueueService:
    await service.store.open()
    await service.start()
    return service


async def stop(service: QueueService) -> None:
    await service.stop()
    await service.store.close()


async def test_callbacks_are_sent_and_retried(make: Make, receiver: Receiver) -> None:
    service = await start(make())
    receiver.fail["/queued"] = 2  # 500 twice, then 200
    callbacks = {"queued": f"{receiver.url}/queued", "finished": f"{receiver.url}/finished"}
    answer = await service.submit(
        USER, "q", {"definition": JOB, "namespace": "cell:1", "callbacks": callbacks}
    )
    await receiver.wait(lambda: bool(receiver.delivered("/queued")), what="queued callback")
    assert [c.status for c in receiver.to("/queued")] == [500, 500, 200]
    expected = {
        "jobId": answer["jobId"],
        "runId": answer["runId"],
        "queue": "q",
        "namespace": "cell:1",
        "state": "Queued",
        "reason": None,
    }
    assert receiver.delivered("/queued") == [expected]
    call = receiver.to("/queued")[-1]
    assert call.headers["Content-Type"] == "application/json"
    assert call.headers["X-Compute-Queue-Event"] == "queued"
    assert receiver.to("/finished") == []  # not before its run finishes

    worker = await connect(service, "w1")
    [assignment] = worker.assigned
    await service.finish("w1", answer["runId"], assignment.fence, Outcome(Reason.FAILED, 3))
    await receiver.wait(lambda: bool(receiver.delivered("/finished")), what="finished callback")
    assert receiver.delivered("/finished") == [expected | {"state": "Finished", "reason": "Failed"}]
    deadline = time.monotonic() + 15
    while await service.store.next_callback_at() is not None:  # all sent: nothing is kept
        assert time.monotonic() < deadline, "a sent callback stayed in the store"
        await asyncio.sleep(0.02)


async def test_joined_cached_and_finished_at_once(make: Make, receiver: Receiver) -> None:
    service = await start(make())
    url = receiver.url
    first = await service.submit(USER, "q", JOB)
    joined = await service.submit(
        USER, "q", {"definition": JOB, "namespace": "b", "callbacks": {"queued": f"{url}/j"}}
    )
    assert joined["runId"] == first["runId"]
    await receiver.wait(lambda: bool(receiver.delivered("/j")))
    assert receiver.delivered("/j")[0]["namespace"] == "b"

    worker = await connect(service, "w1")
    [assignment] = worker.assigned
    await service.finish("w1", first["runId"], assignment.fence, Outcome(Reason.SUCCESS, 0))
    both = {"queued": f"{url}/cq", "finished": f"{url}/cf"}
    cached = await service.submit(USER, "q", {"definition": JOB, "callbacks": both})
    assert cached["cached"] is True
    await receiver.wait(lambda: bool(receiver.delivered("/cf")))
    assert receiver.delivered("/cf")[0] | {"runId": None} == {
        "jobId": first["jobId"],
        "runId": None,
        "queue": "q",
        "namespace": "_",
        "state": "Finished",
        "reason": "Success",
    }
    assert receiver.to("/cq") == []  # a cache hit queues nothing


async def test_a_pending_callback_survives_a_restart(make: Make, receiver: Receiver) -> None:
    first = await start(make())
    receiver.fail["/q"] = 1_000_000  # down, as far as the host can tell
    answer = await first.submit(
        USER, "q", {"definition": JOB, "callbacks": {"queued": f"{receiver.url}/q"}}
    )
    await receiver.wait(lambda: len(receiver.to("/q")) >= 2, what="two failed attempts")
    await stop(first)
    receiver.fail["/q"] = 0

    second = await start(make())
    await receiver.wait(lambda: bool(receiver.delivered("/q")), what="the kept callback")
    assert receiver.delivered("/q")[0]["runId"] == answer["runId"]
    await stop(second)


async def test_gives_up_after_the_last_attempt(
    make: Make, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    service = await start(make(callback_attempts=3))
    receiver.fail["/q"] = 1_000_000
    await service.submit(
        USER, "q", {"definition": JOB, "callbacks": {"queued": f"{receiver.url}/q"}}
    )
    deadline = time.monotonic() + 15
    with caplog.at_level(logging.WARNING, "jupyter_compute_queue.host.callbacks"):
        while await service.store.next_callback_at() is not None or len(receiver.to("/q")) < 3:
            assert time.monotonic() < deadline, receiver.calls
            await asyncio.sleep(0.02)
    assert len(receiver.to("/q")) == 3
    assert "gave up the queued callback" in caplog.text and "answered 500" in caplog.text


async def test_stop_is_prompt_while_callbacks_fly(make: Make, receiver: Receiver) -> None:
    """Stopping while sends finish (each wakes the loop) ends the sender every time."""
    receiver.fail["/q"] = 1_000_000
    for round_ in range(5):
        service = await start(make(callback_backoff=0.001, callback_attempts=1_000_000))
        for n in range(20):
            callbacks = {"queued": f"{receiver.url}/q"}
            await service.submit(
                USER,
                "q",
                {"definition": {**JOB, "env": {"N": f"{round_}-{n}"}}, "callbacks": callbacks},
            )
        enough = 40 * (round_ + 1)
        await receiver.wait(lambda enough=enough: len(receiver.to("/q")) >= enough)
        await asyncio.wait_for(stop(service), 10)


async def test_public_mode_checks_callbacks_at_submit(make: Make) -> None:
    service = make(public=True)
    await service.store.open()  # not started: nothing is ever sent from this test

    async def refused(callbacks: Any, index: int | None = None) -> str:
        item = {"definition": JOB, "callbacks": callbacks}
        with pytest.raises(BadRequest) as info:
            await service.submit(USER, "q", [JOB, item] if index else item)
        return str(info.value)

    assert await refused({"queued": "http://example.org/x"}) == (
        "callbacks.queued: a public host calls https URLs only"
    )
    message = await refused({"finished": "https://localhost:8443/x"})
    assert message.startswith("callbacks.finished: localhost resolves to ")
    assert message.endswith("not a public address; a public host calls public addresses only")
    assert (await refused({"queued": "https://127.0.0.1/"})).startswith(
        "callbacks.queued: 127.0.0.1"
    )
    assert (await refused({"queued": "https://[::1]/"}, 1)).startswith("[1]callbacks.queued: ::1")
    assert (await refused({"started": "https://example.org/"})).startswith(
        "callbacks.started: unknown event"
    )
    assert await refused(["https://example.org/"]) == (
        'callbacks: expected {"queued": URL, "finished": URL}'
    )
    assert await refused({"queued": "ftp://example.org/"}) == (
        "callbacks.queued: expected an absolute http or https URL"
    )
    assert await refused({"queued": 3}) == (
        "callbacks.queued: expected a URL of at most 2048 characters"
    )
    await service.store.close()


async def test_public_mode_checks_again_at_call_time(
    make: Make, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """A callback accepted by a private host (or one whose name later resolves elsewhere:
    DNS rebinding) is checked when it is called: a public host never reaches loopback."""
    private = await start(make(callback_attempts=1_000_000))
    receiver.fail["/q"] = 1_000_000
    url = receiver.url.replace("127.0.0.1", "localhost")
    await private.submit(USER, "q", {"definition": JOB, "callbacks": {"queued": f"{url}/q"}})
    https = url.replace("http://", "https://")
    await private.submit(
        USER, "q", {"definition": {**JOB, "env": {"A": "1"}}, "callbacks": {"queued": f"{https}/s"}}
    )
    await receiver.wait(lambda: bool(receiver.to("/q")), what="a first attempt")
    await stop(private)

    with caplog.at_level(logging.WARNING, "jupyter_compute_queue.host.callbacks"):
        public = await start(make(public=True))
        deadline = time.monotonic() + 15
        while await public.store.next_callback_at() is not None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    calls = len(receiver.to("/q"))
    assert receiver.to("/s") == [] and calls >= 1
    assert "a public host calls https URLs only" in caplog.text
    assert "localhost resolves to" in caplog.text and "not a public address" in caplog.text


async def test_public_resolver_and_addresses() -> None:
    for address in ("1.1.1.1", "2606:4700:4700::1111", "8.8.8.8"):
        assert is_public_address(address), address
    for address in (
        "127.0.0.1",
        "10.1.2.3",
        "172.17.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "::1",
        "fe80::1%eth0",
        "fc00::1",
        "::ffff:127.0.0.1",
        "224.0.0.1",
        "not an address",
    ):
        assert not is_public_address(address), address
    resolver = PublicResolver()
    with pytest.raises(RefusedAddress, match=r"127\.0\.0\.1"):
        await resolver.resolve("127.0.0.1", 443)
    with pytest.raises(RefusedAddress, match="localhost resolves to"):
        await resolver.resolve("localhost", 443)


async def test_finished_callbacks_after_rounds_that_saw_none(
    make: Make, receiver: Receiver
) -> None:
    """A host skips the callback round after a run finishes once it has seen that no callback
    waits for a run: a submission with one, or a restart with one stored, must undo that."""
    service = await start(make())
    worker = await connect(service, "w1", cpus=10)
    plain = await service.submit(USER, "q", {"image": "busybox", "command": "echo plain"})
    await service.finish("w1", plain["runId"], worker.assigned[-1].fence, Outcome(Reason.SUCCESS))
    deadline = time.monotonic() + 15
    while service.callbacks._awaiting_finish:  # a round ran and found nothing waiting
        assert time.monotonic() < deadline, "no callback round after a finished run"
        await asyncio.sleep(0.02)
    callbacks = {"finished": f"{receiver.url}/finished"}
    answer = await service.submit(USER, "q", {"definition": JOB, "callbacks": callbacks})
    await service.finish("w1", answer["runId"], worker.assigned[-1].fence, Outcome(Reason.SUCCESS))
    await receiver.wait(lambda: bool(receiver.delivered("/finished")), what="finished callback")
    assert receiver.delivered("/finished")[0]["runId"] == answer["runId"]

    # Stored and waiting across a restart: the new host's first round sees it.
    again = {"finished": f"{receiver.url}/after-restart"}
    second = await service.submit(
        USER, "q", {"definition": {**JOB, "command": "echo 2"}, "callbacks": again}
    )
    await stop(service)
    restarted = await start(make())
    worker = await connect(restarted, "w1", cpus=10)
    [assignment] = worker.assigned
    assert assignment.record.run_id == second["runId"]
    await restarted.finish("w1", second["runId"], assignment.fence, Outcome(Reason.SUCCESS))
    await receiver.wait(lambda: bool(receiver.delivered("/after-restart")), what="callback")


async def test_an_unanswering_name_server_holds_neither_submit_nor_the_shared_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A name server that never answers (faked: this machine's resolver cannot be made to
    hang) ends a public submission's callback check in RESOLVE_TIMEOUT, and the default pool,
    which blob and log reads use, stays free meanwhile."""
    import threading

    from jupyter_compute_queue.host import callbacks

    release = threading.Event()

    def hanging_getaddrinfo(*args: Any, **kwargs: Any) -> Any:
        release.wait(30)
        raise OSError("released")

    monkeypatch.setattr(callbacks.socket, "getaddrinfo", hanging_getaddrinfo)
    monkeypatch.setattr(callbacks, "RESOLVE_TIMEOUT", 0.5)
    loop = asyncio.get_running_loop()
    try:
        checks = [
            asyncio.ensure_future(
                callbacks.check_callbacks({"finished": f"https://h{i}.example/"}, public=True)
            )
            for i in range(8)
        ]
        started = time.monotonic()
        # Many times the default pool's size of other work still runs at once.
        await asyncio.wait_for(
            asyncio.gather(*(loop.run_in_executor(None, time.sleep, 0) for _ in range(64))), 5
        )
        assert time.monotonic() - started < 0.5
        for check in checks:
            with pytest.raises(BadRequest, match=r"cannot resolve .*no answer in 0.5 s"):
                await check
    finally:
        release.set()
