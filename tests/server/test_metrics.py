"""Prometheus metrics (SPEC §11) from a real Jupyter server, parsed with prometheus_client's
own text parser: per-queue routes, the server's ``/metrics``, public-mode hashing, and one
collector per process however many hosts it runs."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from jupyter_compute_queue.host.access import ANONYMOUS
from jupyter_compute_queue.host.blobs.local import LocalBlobStore
from jupyter_compute_queue.host.logs import LogStore
from jupyter_compute_queue.host.metrics import ServiceCollector, queue_label
from jupyter_compute_queue.host.service import QueueService, ServiceConfig
from jupyter_compute_queue.host.store.base import Outcome, WorkerInfo
from jupyter_compute_queue.host.store.sqlite import SqliteStore
from jupyter_compute_queue.model.capacity import Capacity
from jupyter_compute_queue.model.runs import Reason

from ..conftest import USER, Clock, ScriptedWorker
from .conftest import Fetch

NOBODY = {"Authorization": ""}  # jp_fetch adds the Jupyter token unless told otherwise
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample as ``(name, sorted labels) → value``."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def job(n: int) -> dict[str, Any]:
    return {"image": "busybox", "command": ["echo", str(n)]}


async def test_queue_metrics_after_real_submissions(
    fetch: Fetch, jp_fetch: Fetch, jp_serverapp: Any
) -> None:
    service: QueueService = await jp_serverapp.web_app.settings["compute_queue"].ready()
    for n in range(4):
        r = await fetch("q", "mq", method="POST", json=job(n))
        assert r.code == 200
    await fetch("q", "mq", method="POST", json={"definition": job(0), "namespace": "b"})
    worker = ScriptedWorker(WorkerInfo("mw", ("mq",), Capacity(2)))
    await service.connect_worker(USER, worker.info, [], worker.deliver, worker.stop)
    await service.report_free("mw", worker.info.capacity)
    first, _second = worker.assigned  # job 0 and job 1 run; jobs 2 and 3 wait
    await service.finish("mw", first.record.run_id, first.fence, Outcome(Reason.SUCCESS, 0))
    r = await fetch("q", "mq", "j", _job_id(job(3)), "cancel", method="POST", body=b"")
    assert r.code == 200
    await fetch("q", "mq", method="POST", json=job(0))  # a cache hit

    r = await fetch("q", "mq", "metrics")
    assert r.code == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=")
    found = samples(r.body.decode())
    assert value(found, "queue_length", queue="mq") == 1
    assert value(found, "compute_queue_running", queue="mq") == 1
    assert value(found, "compute_queue_workers", queue="mq") == 1
    assert value(found, "compute_queue_oldest_queued_seconds", queue="mq") is not None
    for outcome, n in (("new", 4), ("joined", 1), ("cached", 1)):
        assert value(found, "compute_queue_submissions_total", queue="mq", outcome=outcome) == n
    for reason in ("Success", "Cancelled"):
        assert value(found, "compute_queue_runs_finished_total", queue="mq", reason=reason) == 1
    # Only the run that started and ended has a duration.
    assert value(found, "compute_queue_run_duration_seconds_count", queue="mq") == 1
    assert value(found, "compute_queue_run_duration_seconds_bucket", queue="mq", le="+Inf") == 1
    assert {labels for _, labels in found} <= {
        (("queue", "mq"),),
        *((("outcome", o), ("queue", "mq")) for o in ("new", "joined", "cached")),
        *((("queue", "mq"), ("reason", r)) for r in ("Success", "Cancelled")),
        *((("le", le), ("queue", "mq")) for le in _bounds()),
    }

    # A queue nobody used has zeros on its own route, and no label in the server's metrics.
    idle = samples((await fetch("q", "idle", "metrics")).body.decode())
    assert value(idle, "queue_length", queue="idle") == 0
    assert value(idle, "compute_queue_workers", queue="idle") == 0
    server = samples((await jp_fetch("metrics")).body.decode())
    assert value(server, "queue_length", queue="mq") == 1
    assert value(server, "compute_queue_submissions_total", queue="mq", outcome="new") == 4
    assert not any(dict(labels).get("queue") == "idle" for _, labels in server)
    await service.disconnect_worker("mw", graceful=True)


@pytest.mark.parametrize("cq_config", [{"public": True}])
async def test_public_mode_hashes_queue_names(fetch: Fetch, jp_fetch: Fetch) -> None:
    queue = "ab12cd34ef56ab78cd90ef12ab34cd56"
    r = await fetch("q", queue, method="POST", json=job(1), headers=NOBODY)
    assert r.code == 200
    label = hashlib.sha256(queue.encode()).hexdigest()[:16]
    assert queue_label(queue, True) == label

    r = await fetch("q", queue, "metrics", headers=NOBODY)  # anonymous, like its status
    assert r.code == 200
    text = r.body.decode()
    assert queue not in text
    assert value(samples(text), "queue_length", queue=label) == 1
    server = (await jp_fetch("metrics")).body.decode()
    assert queue not in server
    assert value(samples(server), "queue_length", queue=label) == 1
    assert (await fetch("q", "local", "metrics", headers=NOBODY)).code == 401


async def test_one_collector_for_many_hosts(tmp_path: Path) -> None:
    """Hosts started in one process share the one registered collector: no duplicate
    registration, and their figures add up (a stopped host's leave)."""
    services = []
    for n in range(3):
        root = tmp_path / f"host{n}"
        service = QueueService(
            SqliteStore(root / "state.sqlite"), LogStore(root / "logs"), LocalBlobStore(root / "b")
        )
        await service.store.open()
        await service.start()
        await service.submit(USER, "shared-q", job(n))
        services.append(service)
    text = generate_latest(REGISTRY).decode()
    names = [family.name for family in text_string_to_metric_families(text)]
    assert len(names) == len(set(names))
    assert names.count("queue_length") == 1
    assert value(samples(text), "queue_length", queue="shared-q") == 3
    for service in services:
        await service.stop()
        await service.store.close()
    after = samples(generate_latest(REGISTRY).decode())
    assert value(after, "queue_length", queue="shared-q") is None


async def test_only_queues_with_recent_activity_are_labelled(tmp_path: Path) -> None:
    clock = Clock()
    service = QueueService(
        SqliteStore(tmp_path / "state.sqlite"),
        LogStore(tmp_path / "logs"),
        LocalBlobStore(tmp_path / "blobs"),
        ServiceConfig(metrics_window=600),
        clock=clock,
    )
    await service.store.open()
    await service.submit(USER, "waiting", job(1))
    done = await service.submit(USER, "done", job(2))
    await service.cancel(USER, "done", done["jobId"], None)
    collector = ServiceCollector(lambda: [service])

    def labelled() -> set[str]:
        return {s.labels["queue"] for family in collector.collect() for s in family.samples}

    assert labelled() == {"waiting", "done"}
    clock.advance(601)
    assert labelled() == {"waiting"}  # it still has a queued run
    assert service.stats.finished == {}  # the idle queue's counters are forgotten
    assert service.metrics(USER, "done").count(b'queue="done"') >= 4  # asked by name: zeros
    with pytest.raises(Exception, match="anonymous"):
        service.metrics(ANONYMOUS, "waiting")
    await service.store.close()


def _bounds() -> list[str]:
    from jupyter_compute_queue.host.metrics import DURATION_BUCKETS

    return [str(b) for b in DURATION_BUCKETS] + ["+Inf"]


def _job_id(definition: dict[str, Any]) -> str:
    from jupyter_compute_queue.model.jobs import job_id, parse_definition

    return job_id(parse_definition(definition))
