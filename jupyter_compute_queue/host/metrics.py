"""Prometheus metrics (SPEC §11): live counts kept by the service, read at scrape time.

Each service keeps a :class:`QueueStats` up to date as its runs change (it also answers the
idle culler). One :class:`ServiceCollector` per process, registered once in prometheus_client's
default registry (which jupyter_server serves at ``/metrics``), reads every live service; a
``q/{queue}/metrics`` request renders the same collector limited to one queue. Only queues with
recent activity get a label (cardinality stays bounded on a public host), and in public mode a
queue's label is a hash of its name, which is a secret there.
"""

from __future__ import annotations

import bisect
import hashlib
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ..model.runs import RunRecord, RunState
from .service_base import ServiceConfig

__all__ = ["QueueStats", "ServiceCollector", "queue_label", "queue_metrics", "track", "untrack"]

_K = TypeVar("_K")


class Measured(Protocol):
    """What the collector reads of a service (:class:`.service.QueueService` is one): its
    counts, its configuration and its connected workers. A protocol, so that the service can
    import this module and not the other way round."""

    stats: QueueStats
    config: ServiceConfig

    def workers_by_queue(self) -> dict[str, int]: ...


#: Upper bounds (seconds) of the run duration histogram's buckets.
DURATION_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 14400.0)
#: Past this many queues remembered, idle ones are forgotten at once (a public host may see
#: any number of queue names).
_MAX_QUEUES = 10_000


@dataclass
class _Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(DURATION_BUCKETS, value)] += 1
        self.total += value


@dataclass
class _Active:
    queue: str
    state: RunState
    queued_at: float


class QueueStats:
    """Live counts of one service: its unfinished runs, and per queue the submissions, the
    finished runs by reason and their durations since the host started."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.active: dict[str, _Active] = {}
        self.last_activity: dict[str, float] = {}
        self.submissions: dict[tuple[str, str], int] = {}
        self.finished: dict[tuple[str, str], int] = {}
        self.durations: dict[str, _Histogram] = {}

    def load(self, records: Iterable[RunRecord]) -> None:
        """Start from the store's unfinished runs."""
        self.active = {}
        for record in records:
            self.run_changed(record)

    def touch(self, queue: str) -> None:
        if queue not in self.last_activity and len(self.last_activity) >= _MAX_QUEUES:
            self.recent_queues(0.0)
        self.last_activity[queue] = self.clock()

    def submitted(self, queue: str, outcome: str) -> None:
        """A submission was answered: ``new``, ``joined`` or ``cached``."""
        self.touch(queue)
        self.submissions[queue, outcome] = self.submissions.get((queue, outcome), 0) + 1

    def run_changed(self, record: RunRecord) -> None:
        """A run's new state; a finish is counted once, for a run this service saw active."""
        self.touch(record.queue)
        if not record.finished:
            active = self.active.get(record.run_id)
            if active is not None and active.state is record.state:
                return  # a phase or a holder: nothing counted here changed
            queued = record.queued_at.timestamp() if record.queued_at else self.clock()
            self.active[record.run_id] = _Active(record.queue, record.state, queued)
            return
        if self.active.pop(record.run_id, None) is None:
            return
        reason = record.reason.value if record.reason else "unknown"
        self.finished[record.queue, reason] = self.finished.get((record.queue, reason), 0) + 1
        if record.started_at is not None and record.finished_at is not None:
            seconds = max(0.0, (record.finished_at - record.started_at).total_seconds())
            self.durations.setdefault(record.queue, _Histogram()).observe(seconds)

    def recent_queues(self, window: float) -> set[str]:
        """Queues with unfinished runs or activity within ``window`` seconds; the counters of
        the others are forgotten."""
        busy = {run.queue for run in self.active.values()}
        cutoff = self.clock() - window
        for queue, last in list(self.last_activity.items()):
            if last < cutoff and queue not in busy:
                del self.last_activity[queue]
                self.durations.pop(queue, None)
        known = set(self.last_activity) | busy
        for counts in (self.submissions, self.finished):
            for labels in [k for k in counts if k[0] not in known]:
                del counts[labels]
        return known


def queue_label(queue: str, public: bool) -> str:
    """A queue's ``queue`` label: its name, or in public mode the first 16 hex digits of its
    sha256 (the name is the secret that opens the queue there)."""
    return hashlib.sha256(queue.encode()).hexdigest()[:16] if public else queue


class ServiceCollector(Collector):
    """Reads the live services at scrape time (all of them, or one queue's figures)."""

    def __init__(self, services: Callable[[], Iterable[Measured]], only: str | None = None) -> None:
        self._services = services
        self._only = only

    def describe(self) -> Iterable[Metric]:
        """The families, without samples: registering never reads a service."""
        return list(_families())

    def collect(self) -> Iterator[Metric]:
        (length, running, workers, oldest, submissions, finished, durations) = _families()
        gauges: dict[str, dict[str, float]] = {"len": {}, "run": {}, "wrk": {}, "old": {}}
        counts: dict[tuple[str, str], float] = {}
        ends: dict[tuple[str, str], float] = {}
        hists: dict[str, _Histogram] = {}
        for service in self._services():
            stats, public = service.stats, service.config.public
            now = stats.clock()
            serving = service.workers_by_queue()
            if self._only is not None:
                queues = {self._only}
            else:
                queues = stats.recent_queues(service.config.metrics_window) | set(serving)
            by_queue: dict[str, list[_Active]] = {}
            for run in list(stats.active.values()):
                by_queue.setdefault(run.queue, []).append(run)
            for queue in queues:
                label = queue_label(queue, public)
                runs = by_queue.get(queue, [])
                queued = [r.queued_at for r in runs if r.state is RunState.QUEUED]
                _add(gauges["len"], label, len(queued))
                _add(gauges["run"], label, sum(r.state is RunState.RUNNING for r in runs))
                _add(gauges["wrk"], label, serving.get(queue, 0))
                age = max(0.0, now - min(queued)) if queued else 0.0
                gauges["old"][label] = max(gauges["old"].get(label, 0.0), age)
            for source, target in ((stats.submissions, counts), (stats.finished, ends)):
                for (queue, kind), n in list(source.items()):
                    if queue in queues:
                        _add(target, (queue_label(queue, public), kind), n)
            for queue, hist in list(stats.durations.items()):
                if queue in queues:
                    merged = hists.setdefault(queue_label(queue, public), _Histogram())
                    merged.counts = [a + b for a, b in zip(merged.counts, hist.counts, strict=True)]
                    merged.total += hist.total
        for family, values in zip((length, running, workers, oldest), gauges.values(), strict=True):
            for label, value in sorted(values.items()):
                family.add_metric([label], value)
        for (label, outcome), value in sorted(counts.items()):
            submissions.add_metric([label, outcome], value)
        for (label, reason), value in sorted(ends.items()):
            finished.add_metric([label, reason], value)
        for label, hist in sorted(hists.items()):
            cumulative, buckets = 0, []
            for bound, n in zip((*DURATION_BUCKETS, float("inf")), hist.counts, strict=True):
                cumulative += n
                buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
            durations.add_metric([label], buckets, hist.total)
        yield from (length, running, workers, oldest, submissions, finished, durations)


def _add(target: dict[_K, float], key: _K, value: float) -> None:
    target[key] = target.get(key, 0.0) + value


_Families = tuple[
    GaugeMetricFamily,
    GaugeMetricFamily,
    GaugeMetricFamily,
    GaugeMetricFamily,
    CounterMetricFamily,
    CounterMetricFamily,
    HistogramMetricFamily,
]


def _families() -> _Families:
    q = ["queue"]
    return (
        GaugeMetricFamily("queue_length", "Runs waiting in the queue", labels=q),
        GaugeMetricFamily("compute_queue_running", "Runs of the queue running now", labels=q),
        GaugeMetricFamily(
            "compute_queue_workers", "Connected workers that serve the queue", labels=q
        ),
        GaugeMetricFamily(
            "compute_queue_oldest_queued_seconds",
            "How long the queue's oldest waiting run has waited",
            labels=q,
        ),
        CounterMetricFamily(
            "compute_queue_submissions",
            "Submissions since the host started, by outcome (new, joined, cached)",
            labels=["queue", "outcome"],
        ),
        CounterMetricFamily(
            "compute_queue_runs_finished",
            "Runs finished since the host started, by reason",
            labels=["queue", "reason"],
        ),
        HistogramMetricFamily(
            "compute_queue_run_duration_seconds",
            "Time from a run's start on a worker to its end",
            labels=q,
        ),
    )


_services: weakref.WeakSet[Measured] = weakref.WeakSet()
_lock = threading.Lock()
_registered = False


def track(service: Measured) -> None:
    """Add a started service to the process's collector (registered on first use)."""
    global _registered
    with _lock:
        _services.add(service)
        if not _registered:
            REGISTRY.register(ServiceCollector(lambda: list(_services)))
            _registered = True


def untrack(service: Measured) -> None:
    """A stopped service's figures leave the process's metrics."""
    with _lock:
        _services.discard(service)


def queue_metrics(service: Measured, queue: str) -> bytes:
    """Prometheus text of one queue of one service (``GET q/{queue}/metrics``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(lambda: [service], only=queue))
    return generate_latest(registry)
