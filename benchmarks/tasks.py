"""The no-op tasks of the RQ and Celery baselines (imported by their worker processes).

Celery's app reads its broker and result backend from ``CQ_BENCH_REDIS`` (set by the benchmark
for the worker processes it starts).
"""

from __future__ import annotations

import os

from celery import Celery

_redis = os.environ.get("CQ_BENCH_REDIS", "redis://127.0.0.1:6379")
#: Broker on database 0, results on database 1 (so counting results is one DBSIZE).
app = Celery("cq_bench", broker=f"{_redis}/0", backend=f"{_redis}/1")
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


def noop(i: int) -> int:
    """RQ's task: nothing."""
    return i


@app.task(name="cq_bench.noop")
def celery_noop(i: int) -> int:
    """Celery's task: nothing."""
    return i
