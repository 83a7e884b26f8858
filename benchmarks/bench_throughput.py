"""Queue throughput: runs per second from the first submission until the last run finished,
with 10 workers whose runtime completes runs at once (``--runtime noop``), against RQ and
Celery on Redis running no-op tasks with 10 workers on the same machine.

Ours: the host is a ``jupyter compute-queue serve`` process; the 10 workers are real agents
(the worker's protocol code, each with its own websocket) running as asyncio tasks in the
benchmark's process, each offering room for ``CAPACITY`` runs at once. A run counts as finished
when its worker hears ``accepted`` (sent after the host's commit). A second figure runs the
workers as 10 ``jupyter compute-queue worker --runtime noop`` processes (finished = the host's
status counts). RQ's and Celery's workers are processes, as they are normally run: 10
``rq worker`` processes (``SimpleWorker``: no fork per job, RQ's fastest form), and one Celery
worker with a prefork pool of 10; finished = RQ's finished registry, Celery's stored results.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

from .agents import Agents
from .common import ROOT, Figure, Settings, say
from .host import Host, Http, stop_process, wait_workers, worker_process
from .redis_server import RedisServer, RedisUnavailable

WORKERS = 10
CAPACITY = 10  # runs one of our workers takes at once (a noop run takes 1 cpu)
BATCH = 100  # runs per submission request / enqueue call
POLL = 0.02


def _patience(n: int) -> float:
    """How long n runs may take before the benchmark gives up (a stuck run is a failure to
    report, not a reason to hang)."""
    return 60 + n / 25


def _definitions(start: int, stop: int, tag: str) -> list[dict[str, object]]:
    return [{"image": "bench/noop", "command": ["run", tag, str(i)]} for i in range(start, stop)]


async def ours_in_process(settings: Settings, n: int) -> float:
    """Runs per second with 10 in-process agents."""
    async with Host(settings.workdir / "tp-host") as host:
        done: list[float] = []
        all_done = asyncio.Event()

        def accepted(run_id: str, at: float) -> None:
            done.append(at)
            if len(done) >= n:
                all_done.set()

        async with Agents(host) as agents:
            for i in range(WORKERS):
                await agents.start(f"tp-{i}", ("tp",), CAPACITY, on_accepted=accepted)
            http = Http(host.port)
            start = time.perf_counter()
            for b in range(0, n, BATCH):
                await http.json(
                    "POST", "compute-queue/q/tp", _definitions(b, min(n, b + BATCH), "a")
                )
            try:
                await asyncio.wait_for(all_done.wait(), _patience(n))
            except asyncio.TimeoutError:
                raise RuntimeError(f"only {len(done)} of {n} runs finished in time") from None
            await http.close()
            return n / (max(done) - start)


async def ours_processes(settings: Settings, n: int) -> float:
    """Runs per second with 10 worker processes (``--runtime noop``)."""
    async with Host(settings.workdir / "tpp-host") as host:
        http = Http(host.port)
        processes = [
            worker_process(
                host,
                ["tpp"],
                settings.workdir / f"tpp-worker-{i}",
                "--runtime",
                "noop",
                "--id",
                f"tpp-{i}",
                "--cpus",
                str(CAPACITY),
            )
            for i in range(WORKERS)
        ]
        try:
            await wait_workers(http, "tpp", WORKERS)
            start = time.perf_counter()
            for b in range(0, n, BATCH):
                await http.json(
                    "POST", "compute-queue/q/tpp", _definitions(b, min(n, b + BATCH), "p")
                )
            while True:
                status = await http.json("GET", "compute-queue/q/tpp/status")
                if status["counts"]["Finished"] >= n:
                    end = time.perf_counter()
                    break
                if time.perf_counter() - start > _patience(n):
                    raise RuntimeError(f"runs not finished in time: {status['counts']}")
                await asyncio.sleep(POLL)
            return n / (end - start)
        finally:
            await http.close()
            await asyncio.gather(*(stop_process(p) for p in processes))


def _env(redis_url: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "CQ_BENCH_REDIS": redis_url}


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _spawn_rq(url: str, logs: Path) -> list[subprocess.Popen[bytes]]:
    with open(logs, "wb") as log:
        return [
            subprocess.Popen(
                [
                    _bin("rq"),
                    "worker",
                    "--url",
                    url,
                    "--worker-class",
                    "rq.worker.SimpleWorker",
                    "--name",
                    f"rq-{i}",
                    "--quiet",
                    "bench",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=_env(url),
                cwd=ROOT,
            )
            for i in range(WORKERS)
        ]


def _spawn_celery(env: dict[str, str], logs: Path) -> subprocess.Popen[bytes]:
    with open(logs, "wb") as log:
        return subprocess.Popen(
            [
                _bin("celery"),
                "-A",
                "benchmarks.tasks",
                "worker",
                "--pool",
                "prefork",
                "--concurrency",
                str(WORKERS),
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "--loglevel",
                "WARNING",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=ROOT,
        )


async def rq_baseline(settings: Settings, redis_server: RedisServer, n: int) -> float:
    """Runs per second through RQ: 10 ``rq worker`` processes (SimpleWorker)."""
    import redis
    from rq import Queue, Worker
    from rq.registry import FinishedJobRegistry

    conn = redis.Redis(port=redis_server.port)
    conn.flushall()
    logs = settings.workdir / "rq-workers.log"
    processes = _spawn_rq(redis_server.url, logs)
    try:
        deadline = time.monotonic() + 60
        while Worker.count(connection=conn) < WORKERS:
            if time.monotonic() > deadline:
                raise RuntimeError(f"RQ workers did not start; see {logs}")
            await asyncio.sleep(0.1)
        queue = Queue("bench", connection=conn)
        finished = FinishedJobRegistry(queue=queue)

        def submit() -> None:
            for b in range(0, n, BATCH):
                queue.enqueue_many(
                    [
                        Queue.prepare_data("benchmarks.tasks.noop", args=(i,))
                        for i in range(b, min(n, b + BATCH))
                    ]
                )

        start = time.perf_counter()
        submitting = asyncio.ensure_future(asyncio.to_thread(submit))
        while True:
            if finished.count >= n:
                end = time.perf_counter()
                break
            if time.perf_counter() - start > _patience(n):
                raise RuntimeError(f"only {finished.count} of {n} RQ jobs finished in time")
            await asyncio.sleep(POLL)
        await submitting
        return n / (end - start)
    finally:
        await asyncio.gather(*(stop_process(p) for p in processes))
        conn.close()


async def celery_baseline(settings: Settings, redis_server: RedisServer, n: int) -> float:
    """Runs per second through Celery: one worker with a prefork pool of 10 processes."""
    import redis

    conn = redis.Redis(port=redis_server.port)
    conn.flushall()
    results = redis.Redis(port=redis_server.port, db=1)
    env = _env(redis_server.url)
    logs = settings.workdir / "celery-worker.log"
    process = _spawn_celery(env, logs)
    os.environ["CQ_BENCH_REDIS"] = redis_server.url
    sys.modules.pop("benchmarks.tasks", None)  # its app reads CQ_BENCH_REDIS when imported
    tasks = importlib.import_module("benchmarks.tasks")

    try:
        deadline = time.monotonic() + 60
        while not await asyncio.to_thread(tasks.app.control.ping, timeout=0.5):
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"the Celery worker did not start; see {logs}")
        # Its pool of 10 must be up too: a first round trip through the queue.
        await asyncio.to_thread(tasks.celery_noop.delay(-1).get, timeout=60)
        results.flushdb()

        def submit() -> None:
            for i in range(n):
                tasks.celery_noop.apply_async((i,))

        start = time.perf_counter()
        submitting = asyncio.ensure_future(asyncio.to_thread(submit))
        while True:
            if results.dbsize() >= n:
                end = time.perf_counter()
                break
            if time.perf_counter() - start > _patience(n):
                raise RuntimeError(f"only {results.dbsize()} of {n} Celery results in time")
            await asyncio.sleep(POLL)
        await submitting
        return n / (end - start)
    finally:
        await stop_process(process)
        conn.close()
        results.close()


async def measure(settings: Settings) -> list[Figure]:
    n = settings.size(5000, 300, 50)
    say(f"throughput: {n} runs, {WORKERS} in-process noop workers")
    agents = await ours_in_process(settings, n)
    say(f"throughput: ours (in-process workers) {agents:.0f} runs/s")
    baselines: dict[str, float] = {}
    try:
        async with RedisServer(settings.workdir / "redis") as redis_server:
            say(f"throughput: {n} RQ jobs, {WORKERS} rq worker processes")
            baselines["RQ"] = await rq_baseline(settings, redis_server, n)
            say(f"throughput: RQ {baselines['RQ']:.0f} runs/s")
            say(f"throughput: {n} Celery tasks, prefork pool of {WORKERS}")
            baselines["Celery"] = await celery_baseline(settings, redis_server, n)
            say(f"throughput: Celery {baselines['Celery']:.0f} runs/s")
    except RedisUnavailable as exc:
        say(f"throughput: no RQ/Celery baseline: {exc}")
    processes: float | None = None
    if not settings.quick:  # 10 more processes to start: the full run only
        say(f"throughput: {n} runs, {WORKERS} noop worker processes")
        processes = await ours_processes(settings, n)
        say(f"throughput: ours (worker processes) {processes:.0f} runs/s")
    base = ", ".join(f"{k} {v:,.0f} runs/s" for k, v in baselines.items()) or "none (no Redis)"
    best = max(baselines.values(), default=0.0)
    detail = f"{n} runs, 10 workers x {CAPACITY} runs at once; RQ/Celery: 10 worker processes"
    figures = [
        Figure(
            "queue_throughput",
            agents,
            "runs/s",
            "≥ 1,000 runs/s and ahead of RQ and Celery",
            agents >= 1000 and agents > best,
            base,
            detail + "; ours: 10 agents in one process",
        )
    ]
    if processes is not None:
        figures.append(
            Figure(
                "queue_throughput_worker_processes",
                processes,
                "runs/s",
                "≥ 1,000 runs/s and ahead of RQ and Celery",
                processes >= 1000 and processes > best,
                base,
                detail + "; ours: 10 `worker --runtime noop` processes",
            )
        )
    return figures
