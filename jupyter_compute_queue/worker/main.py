"""``jupyter compute-queue worker``: check what the worker needs, then run its agent.

Problems a person can fix (no Docker engine, a host that does not answer, refused credentials,
a data dir in use) end the command at start with a message saying what to do; once running,
the worker reconnects to its host with backoff.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import os
import signal
import sys
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from jupyter_core.paths import jupyter_data_dir

from ..model.units import parse_duration, parse_size
from .agent import Agent, FatalError, WorkerOptions
from .docker_runner import DockerRunner, RunnerConfig
from .egress import Allowed, parse_allowed
from .noop_runner import NoopRunner
from .resources import ResourceError, Resources, parse_gpus
from .runtime import Runtime
from .transfer import ContentCache, Transfers

log = logging.getLogger("jupyter_compute_queue.worker")


class StartError(Exception):
    """Something the person starting the worker must fix; the message says what."""


def main(args: argparse.Namespace) -> int:
    """Run a worker until SIGTERM/SIGINT; the exit status says how it ended."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        agent, lock = setup(args)
    except StartError as exc:
        print(f"jupyter compute-queue worker: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve(agent))
    except FatalError as exc:
        print(f"jupyter compute-queue worker: {exc}", file=sys.stderr)
        return 3
    finally:
        lock.close()


#: Threads for blocking Docker calls. Every running container holds two for its whole life
#: (its attach stream and its wait), so asyncio's default pool (cpu count + 4) would let a few
#: long runs starve every other Docker call: new runs, and stopping a cancelled one.
EXECUTOR_THREADS = 256


async def _serve(agent: Agent) -> int:
    loop = asyncio.get_running_loop()
    loop.set_default_executor(
        ThreadPoolExecutor(EXECUTOR_THREADS, thread_name_prefix="compute-queue-worker")
    )
    stopping: list[asyncio.Task[None]] = []

    def on_signal() -> None:
        if not stopping:
            log.info(
                "compute-queue worker: stopping (runs get %ss to finish)",
                agent.options.grace_seconds,
            )
            stopping.append(asyncio.ensure_future(agent.shutdown()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await agent.run_forever()
    for task in stopping:
        await task
    return 0


def setup(args: argparse.Namespace) -> tuple[Agent, IO[str]]:
    """Check everything a person could get wrong, and build the agent."""
    url = args.url or os.environ.get("COMPUTE_QUEUE_URL")
    token = args.token or os.environ.get("COMPUTE_QUEUE_TOKEN")
    if not url:
        raise StartError("give the host's URL with --url or COMPUTE_QUEUE_URL")
    api = url.rstrip("/") + "/compute-queue/"
    try:
        memory = parse_size(args.memory) if args.memory else None
        max_duration = parse_duration(args.max_job_duration)
        max_output = parse_size(args.max_output_bytes)
        max_disk = parse_size(args.max_disk_bytes) if args.max_disk_bytes else None
        max_cache = parse_size(args.max_cache_bytes)
        grace = parse_duration(args.grace)
        gpus = parse_gpus(args.gpus)
        allow_egress = tuple(parse_allowed(text) for text in args.allow_egress)
    except (ValueError, ResourceError) as exc:
        raise StartError(str(exc)) from None
    data_dir = Path(args.data_dir or Path(jupyter_data_dir()) / "compute-queue-worker")
    data_dir.mkdir(parents=True, exist_ok=True)
    # The worker's own: the content cache and run folders hold other people's inputs and
    # outputs, which no other user of the machine may read.
    _make_private(data_dir)
    lock = _lock(data_dir)
    worker_id = args.id or _worker_id(data_dir)
    runner: Runtime
    if args.runtime == "noop":
        check_host(api)
        runner = NoopRunner()
        log.warning("compute-queue worker: --runtime noop runs nothing: for benchmarks only")
    else:
        runner = _docker_runner(
            args,
            api,
            token,
            data_dir,
            worker_id,
            memory,
            max_duration,
            max_output,
            max_disk,
            max_cache,
            allow_egress,
        )
    options = WorkerOptions(
        url=api,
        token=token,
        worker_id=worker_id,
        queues=tuple(args.queues),
        tags=tuple(t for t in args.tags.split(",") if t),
        max_job_duration=max_duration,
        grace_seconds=grace,
    )
    log.info("compute-queue worker %s serving %s at %s", worker_id, ", ".join(args.queues), api)
    return Agent(options, Resources(args.cpus, memory, gpus), runner), lock


def _docker_runner(
    args: argparse.Namespace,
    api: str,
    token: str | None,
    data_dir: Path,
    worker_id: str,
    memory: int | None,
    max_duration: int,
    max_output: int,
    max_disk: int | None,
    max_cache: int,
    allow_egress: tuple[Allowed, ...],
) -> DockerRunner:
    """The default runtime, once the Docker engine and the host answer."""
    client = docker_client()
    check_host(api)
    runner = DockerRunner(
        client,
        RunnerConfig(
            data_dir=data_dir,
            worker_id=worker_id,
            network=args.network,
            container_user=args.container_user,
            max_output_bytes=max_output,
            max_disk_bytes=max_disk,
            default_memory=memory,
            max_job_duration=max_duration,
            allow_egress=allow_egress,
        ),
        Transfers(api, token, ContentCache(data_dir / "cache", max_cache)),
        api,
    )
    if args.network != "none":
        # Made once here, before any run: runs starting together would each create one (Docker
        # allows duplicate names), and a container on an ambiguous network name cannot start.
        # Its egress rules come with it (or the warning that they cannot).
        try:
            runner.network.name()
        except Exception as exc:
            raise StartError(f"cannot create the worker's Docker network ({exc})") from None
    return runner


def docker_client() -> Any:
    """A Docker client that answers, or StartError saying how to get one."""
    import docker
    import docker.errors

    try:
        client = docker.from_env()
        client.ping()
        return client
    except docker.errors.DockerException as exc:
        raise StartError(
            f"cannot reach the Docker engine ({exc}). Start it (e.g. `sudo systemctl start "
            "docker`, or `sudo dockerd &`), make sure this user may use it (the `docker` "
            "group), or point DOCKER_HOST at it"
        ) from None


def check_host(api: str) -> None:
    """The host must answer its health check before the worker starts."""
    try:
        with urllib.request.urlopen(api + "healthz", timeout=10) as response:
            if response.status == 200:
                return
    except urllib.error.HTTPError as exc:
        raise StartError(
            f"{api}healthz answered {exc.code}: is --url the Jupyter server's "
            "URL with its base URL, and is jupyter-compute-queue installed there?"
        ) from None
    except (OSError, ValueError) as exc:
        raise StartError(f"cannot reach the host at {api} ({exc})") from None


def _make_private(data_dir: Path) -> None:
    """Close the data dir to other users (0700), or warn when it cannot be."""
    try:
        mode = data_dir.stat().st_mode & 0o777
        if mode & 0o077:
            os.chmod(data_dir, mode & 0o700)
    except OSError as exc:
        log.warning(
            "compute-queue worker: cannot make %s private to this user (%s): other users of "
            "this machine may read the jobs' inputs and outputs in it",
            data_dir,
            exc.strerror or exc,
        )


def _lock(data_dir: Path) -> IO[str]:
    handle = open(data_dir / "worker.lock", "a+")  # noqa: SIM115 - held for the worker's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StartError(
            f"another worker uses {data_dir}: give this one its own --data-dir"
        ) from None
    return handle


def _worker_id(data_dir: Path) -> str:
    """The worker's lasting id: a restarted worker is the same worker (SPEC §5)."""
    path = data_dir / "worker-id"
    if path.exists():
        return path.read_text().strip()
    worker_id = f"{os.uname().nodename.split('.')[0][:24]}-{uuid.uuid4().hex[:8]}"
    path.write_text(worker_id + "\n")
    return worker_id
