"""One run in one container: image, inputs, limits, live logs, timeout, output cap, outputs.

The runner knows nothing about the host: the agent gives it a run and callbacks for phases and
log lines, and gets a result back. Every blocking Docker SDK call runs in a thread.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..jobs import JobDefinition, command_argv
from ..runs import OutputRef, Phase, Reason
from .images import ImageError, build_image, ensure_image
from .prepare import RunFolder, job_cache, output_files, prepare, tree_size
from .resources import cuda_visible_devices, docker_device_request
from .runtime import Logs, Phases, Run, RunResult
from .transfer import TransferError, Transfers

__all__ = ["LABEL_RUN", "LABEL_WORKER", "DockerRunner", "Run", "RunResult", "RunnerConfig"]

logger = logging.getLogger(__name__)

LABEL_WORKER = "compute-queue.worker"
LABEL_RUN = "compute-queue.run"


@dataclass
class RunnerConfig:
    """How this worker runs containers (from its command line)."""

    data_dir: Path
    worker_id: str
    network: Literal["bridge", "none", "internal"] = "bridge"
    container_user: Literal["worker", "image"] = "worker"
    max_output_bytes: int = 1024**3
    default_memory: int | None = None
    max_job_duration: int = 3600
    image_timeout: float = 1800.0
    cancel_grace: float = 0.5
    pids_limit: int = 4096
    job_cache_bytes: int = 10 * 1024**3
    output_poll_seconds: float = 1.0


class DockerRunner:
    """The default :class:`~.runtime.Runtime`: runs containers for one worker; every container
    carries the worker's and the run's label."""

    def __init__(self, client: Any, config: RunnerConfig, transfers: Transfers, host_api: str):
        self.client = client
        self.config = config
        self.transfers = transfers
        self.host_api = host_api
        self._stopping: dict[str, str] = {}  # run id → why it is being stopped
        self._containers: dict[str, Any] = {}
        self._cleaning: set[asyncio.Future[None]] = set()  # removals of finished runs
        self._network: str | None = None
        self._network_lock = threading.Lock()

    async def run(self, run: Run, phase: Phases, log: Logs) -> RunResult:
        """Run to the end; never raises for the job's own failures (they are results)."""
        definition = run.definition
        sys_log: Callable[[str], None] = lambda text: log("sys", text)  # noqa: E731
        digest: str | None = None
        folder: RunFolder | None = None
        try:
            phase(Phase.BUILDING if definition.build else Phase.PULLING, None)
            digest = await asyncio.wait_for(
                self._image(definition, sys_log), self.config.image_timeout
            )
            phase(Phase.PREPARING, digest)
            folder = await prepare(
                self.config.data_dir / "runs",
                run.run_id,
                definition,
                run.blobs,
                self.transfers,
                self.host_api,
            )
            if run.run_id in self._stopping:
                return RunResult(Reason.CANCELLED, message=self._stopping[run.run_id])
            container = await asyncio.to_thread(self._create, run, digest, folder)
            self._containers[run.run_id] = container
            result = await self._execute(run, container, folder, phase, log)
            if result.reason in (Reason.SUCCESS, Reason.FAILED):
                phase(Phase.UPLOADING, None)
                result.outputs = await self._upload(folder)
            result.image_digest = digest
            return result
        except asyncio.TimeoutError:
            return RunResult(Reason.ERROR, message="pulling or building the image took too long")
        except ImageError as exc:
            return RunResult(Reason.ERROR, message=str(exc))
        except TransferError as exc:
            return RunResult(
                Reason.ERROR, message=f"moving a file failed: {exc}", image_digest=digest
            )
        finally:
            self._stopping.pop(run.run_id, None)
            # The result goes to the host now; the exited container and the run folder are
            # removed right after, in the background (``close`` waits for that): their removal
            # (20 to 30 ms) is off every run's time to its result.
            self._clean_later(self._containers.pop(run.run_id, None), folder)

    async def stop(self, run_id: str, why: str = "cancelled") -> None:
        """Stop a run's container: SIGTERM, then SIGKILL after the grace period."""
        self._stopping.setdefault(run_id, why)
        container = self._containers.get(run_id)
        if container is not None:
            await asyncio.to_thread(_stop, container, self.config.cancel_grace)

    def running(self) -> list[str]:
        return list(self._containers)

    async def close(self) -> None:
        """Wait until the containers and folders of finished runs are removed, then remove the
        worker's network: the engine's address pools are few (about 30 bridge networks), so a
        network left behind by every worker that ever ran would soon stop all containers."""
        while self._cleaning:
            await asyncio.wait(set(self._cleaning))
        with self._network_lock:
            name, self._network = self._network, None
        if name is not None and not self._containers:
            await asyncio.to_thread(self._remove_network, name)

    def _remove_network(self, name: str) -> None:
        for attempt in range(10):
            try:
                for network in self.client.networks.list(names=[name]):
                    if network.name == name:  # the name filter also matches longer names
                        network.remove()
                return
            except Exception as exc:  # the engine may still release a removed container's
                if attempt == 9:  # endpoint; else in use (a container outlived its run)
                    logger.warning("compute-queue worker: network %s left behind: %s", name, exc)
                time.sleep(0.2)

    def _clean_later(self, container: Any, folder: RunFolder | None) -> None:
        if container is None and folder is None:
            return
        task = asyncio.ensure_future(self._clean(container, folder))
        self._cleaning.add(task)
        task.add_done_callback(self._cleaning.discard)

    async def _clean(self, container: Any, folder: RunFolder | None) -> None:
        if container is not None:
            with contextlib.suppress(Exception):  # gone already (a leftover sweep, a restart)
                await asyncio.to_thread(container.remove, force=True)
        if folder is not None:
            try:
                await asyncio.to_thread(folder.remove)
            except OSError as exc:
                logger.warning("compute-queue worker: cannot remove %s: %s", folder.root, exc)

    async def remove_leftovers(self, keep: set[str]) -> list[str]:
        """Remove this worker's containers of runs it no longer holds (never anyone else's)."""
        label = f"{LABEL_WORKER}={self.config.worker_id}"
        # Sparse: the list's own labels, without inspecting each container — one removed
        # meanwhile (a run that just ended) would make a full listing fail with NotFound.
        found = await asyncio.to_thread(
            self.client.containers.list, all=True, sparse=True, filters={"label": label}
        )
        removed = []
        for container in found:
            run_id = (container.attrs.get("Labels") or {}).get(LABEL_RUN)
            if run_id not in keep:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(container.remove, force=True)
                removed.append(run_id or container.id)
        return removed

    # --- the steps ------------------------------------------------------------------------

    async def _image(self, definition: JobDefinition, log: Callable[[str], None]) -> str:
        if definition.build is not None:
            return await build_image(self.client, definition.build, log)
        assert definition.image is not None
        return await ensure_image(self.client, definition.image, log)

    def _create(self, run: Run, image: str, folder: RunFolder) -> Any:
        d = run.definition
        cfg = self.config
        z = ",Z" if _selinux() else ""
        volumes = {
            str(folder.inputs): {"bind": "/inputs", "mode": "rw" + z},
            str(folder.outputs): {"bind": "/outputs", "mode": "rw" + z},
            str(job_cache(cfg.data_dir / "job-cache", run.queue, cfg.job_cache_bytes)): {
                "bind": "/job-cache",
                "mode": "rw" + z,
            },
        }
        for target, source in folder.single_files.items():
            volumes[str(source)] = {"bind": target, "mode": "ro" + z}
        env = {
            **d.env,
            "JOB_ID": run.job_id,
            "JOB_RUN_ID": run.run_id,
            "JOB_QUEUE": run.queue,
            "JOB_INPUTS": "/inputs",
            "JOB_OUTPUTS": "/outputs",
            "JOB_CACHE": "/job-cache",
            "JOB_URL": run.job_url,
            "JOB_INPUTS_URL_PREFIX": f"{run.job_url}/inputs/",
            "JOB_OUTPUTS_URL_PREFIX": f"{run.job_url}/outputs/",
        }
        gpus = run.allocation.gpus
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices(len(gpus))
        memory = d.memory or cfg.default_memory
        return self.client.containers.create(
            image,
            command=command_argv(d.command),
            entrypoint=command_argv(d.entrypoint),
            environment=env,
            working_dir=d.workdir,
            volumes=volumes,
            labels={
                LABEL_WORKER: cfg.worker_id,
                LABEL_RUN: run.run_id,
                "compute-queue.job": run.job_id,
                "compute-queue.queue": run.queue,
                "compute-queue.fence": str(run.fence),
            },
            name=f"cq-{run.run_id[:16]}-{run.fence}-{cfg.worker_id[:8]}",
            init=True,
            nano_cpus=int(d.cpus * 1e9) if d.cpus else None,
            mem_limit=memory,
            memswap_limit=memory,
            shm_size=d.shm_size,
            pids_limit=cfg.pids_limit,
            security_opt=["no-new-privileges"],
            privileged=False,
            user=f"{os.getuid()}:{os.getgid()}" if cfg.container_user == "worker" else None,
            network=self._network_name() if cfg.network != "none" else None,
            network_mode="none" if cfg.network == "none" else None,
            device_requests=[docker_device_request(gpus)] if gpus else None,
            detach=True,
        )

    def _network_name(self) -> str:
        """The worker's own bridge network, made once: no traffic between its containers, and
        with ``internal`` no route out at all."""
        # Runs create containers from several threads at once, and the engine accepts two
        # networks of one name (which then makes every container start fail as ambiguous).
        with self._network_lock:
            if self._network is None:
                internal = self.config.network == "internal"
                name = f"compute-queue-{self.config.worker_id}{'-internal' if internal else ''}"
                # The engine's name filter also matches longer names ("…-w1" finds "…-w10").
                if not any(n.name == name for n in self.client.networks.list(names=[name])):
                    self.client.networks.create(
                        name,
                        driver="bridge",
                        internal=internal,
                        check_duplicate=True,
                        options={"com.docker.network.bridge.enable_icc": "false"},
                        labels={LABEL_WORKER: self.config.worker_id},
                    )
                self._network = name
            return self._network

    async def _execute(
        self, run: Run, container: Any, folder: RunFolder, phase: Phases, log: Logs
    ) -> RunResult:
        loop = asyncio.get_running_loop()
        stream = await asyncio.to_thread(
            self.client.api.attach, container.id, stream=True, logs=True, demux=True
        )
        pump = asyncio.ensure_future(asyncio.to_thread(_pump, stream, loop, log))
        await asyncio.to_thread(container.start)
        phase(Phase.RUNNING, None)
        limit = min(
            run.definition.max_duration or self.config.max_job_duration,
            self.config.max_job_duration,
        )
        waiter = asyncio.ensure_future(asyncio.to_thread(container.wait))
        deadline = time.monotonic() + limit
        why: Reason | None = None
        message: str | None = None
        while not waiter.done():
            done, _ = await asyncio.wait({waiter}, timeout=self.config.output_poll_seconds)
            if done:
                break
            if run.run_id in self._stopping:
                why, message = Reason.CANCELLED, self._stopping[run.run_id]
            elif time.monotonic() > deadline:
                why, message = Reason.TIMED_OUT, f"ran past its limit of {limit} s"
            elif (message := await self._over_cap(folder)) is not None:
                why = Reason.ERROR
            if why is not None:
                log("sys", f"stopping the container: {message}\n")
                await asyncio.to_thread(_stop, container, self.config.cancel_grace)
                break
        status = await waiter
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(pump, 10)
        code = int(status.get("StatusCode", -1))
        if why is not None:
            return RunResult(why, exit_code=code, message=message)
        if run.run_id in self._stopping:
            return RunResult(Reason.CANCELLED, exit_code=code, message=self._stopping[run.run_id])
        # A job can write past the cap and exit between two samples: check once more before
        # anything is uploaded.
        if (message := await self._over_cap(folder)) is not None:
            log("sys", message + "\n")
            return RunResult(Reason.ERROR, exit_code=code, message=message)
        if code == 0:
            return RunResult(Reason.SUCCESS, exit_code=0)
        state = (await asyncio.to_thread(_inspect, container)).get("State", {})
        if code == 137 and state.get("OOMKilled"):
            limit_text = run.definition.memory or self.config.default_memory
            message = f"killed for using more memory than its limit ({limit_text} bytes)"
            log("sys", message + "\n")
            return RunResult(Reason.FAILED, exit_code=code, message=message)
        return RunResult(Reason.FAILED, exit_code=code, message=f"exited with code {code}")

    async def _over_cap(self, folder: RunFolder) -> str | None:
        """Why the run must end when /outputs holds more than the cap, else None."""
        size = await asyncio.to_thread(tree_size, folder.outputs)
        if size <= self.config.max_output_bytes:
            return None
        return f"/outputs grew past the cap of {self.config.max_output_bytes} bytes ({size})"

    async def _upload(self, folder: RunFolder) -> dict[str, OutputRef]:
        outputs = {}
        for path, file in await asyncio.to_thread(lambda: list(output_files(folder.outputs))):
            key, size = await self.transfers.upload(file)
            outputs[path] = OutputRef(key=key, size=size)
        return outputs


def _stop(container: Any, grace: float) -> None:
    """SIGTERM, then SIGKILL once ``grace`` seconds passed.

    Not ``container.stop(timeout=grace)``: the engine takes whole seconds only and refuses
    ``t=0.5`` (a 500 error), which left the container running.
    """
    try:
        container.kill(signal="SIGTERM")
        container.wait(timeout=grace)  # raises when the grace passes first
    except Exception:
        with contextlib.suppress(Exception):
            container.kill()  # SIGKILL; fails only when the container is gone already


def _inspect(container: Any) -> dict[str, Any]:
    container.reload()
    return container.attrs  # type: ignore[no-any-return]


def _pump(stream: Any, loop: asyncio.AbstractEventLoop, log: Logs) -> None:
    """Read the attach stream (a thread) and hand decoded text to the event loop as it comes.

    One incremental decoder per stream, so a character split across chunks is not mangled.
    """
    decoders = {
        "out": codecs.getincrementaldecoder("utf-8")("replace"),
        "err": codecs.getincrementaldecoder("utf-8")("replace"),
    }
    for stdout, stderr in stream:
        for name, chunk in (("out", stdout), ("err", stderr)):
            if chunk:
                text = decoders[name].decode(chunk)
                if text:
                    loop.call_soon_threadsafe(log, name, text)
    for name, decoder in decoders.items():
        tail = decoder.decode(b"", final=True)
        if tail:
            loop.call_soon_threadsafe(log, name, tail)


def _selinux() -> bool:
    """Mounts need ``:Z`` where SELinux enforces."""
    try:
        return Path("/sys/fs/selinux/enforce").read_text().strip() == "1"
    except OSError:
        return False
