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
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import requests.exceptions

from ..model.jobs import JobDefinition, command_argv
from ..model.runs import OutputRef, Phase, Reason
from . import engine_copy
from .disk import DiskMeter, over_caps
from .egress import Allowed
from .fetch_policy import FetchPolicy, FetchRefused, input_refusal
from .images import ImageError, build_image, ensure_image
from .job_network import JobNetwork
from .prepare import RunFolder, job_cache, output_files, prepare
from .resources import cuda_visible_devices, docker_device_request
from .runtime import Logs, Phases, Run, RunResult, RuntimeLost
from .transfer import TransferError, Transfers

__all__ = ["LABEL_RUN", "LABEL_WORKER", "DockerRunner", "Run", "RunResult", "RunnerConfig"]

logger = logging.getLogger(__name__)

LABEL_WORKER = "compute-queue.worker"
LABEL_RUN = "compute-queue.run"
#: An engine that shuts down stops its containers first and answers a while longer (until the
#: slowest container's stop timeout, 10 s by default): how long a container stopped from
#: outside waits to see whether its engine goes away.
ENGINE_SHUTDOWN_SECONDS = 15.0
#: How often a worker whose engine went away asks whether it is back.
ENGINE_POLL_SECONDS = 0.5
#: What a run may write to the worker's disk beyond its ``--max-output-bytes``, unless the
#: worker's ``--max-disk-bytes`` says otherwise: as much as a queue's job cache keeps.
DISK_HEADROOM = 10 * 1024**3


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
    #: The cap on all a run writes to the worker's disk (``/outputs`` included; see
    #: ``disk.py``); None: ``max_output_bytes`` + ``DISK_HEADROOM``.
    max_disk_bytes: int | None = None
    #: How often the container's writable layer and the queue's job cache are measured (the
    #: engine walks the whole layer: tens of ms for tens of thousands of files); ``/outputs``
    #: and ``/inputs`` are measured every ``output_poll_seconds``.
    disk_poll_seconds: float = 5.0
    #: Private destinations jobs may reach all the same (``--allow-egress``); also where the
    #: worker may fetch a job's URLs (inputs, build contexts) all the same.
    allow_egress: tuple[Allowed, ...] = ()
    #: The iptables program for the egress rules; None: the one holding the engine's chains.
    iptables: str | None = None


class DockerRunner:
    """The default :class:`~.runtime.Runtime`: runs containers for one worker; every container
    carries the worker's and the run's label.

    The URLs a job gives (``url`` inputs, a build context) are fetched under
    :attr:`fetch_policy`, the jobs' own network policy (``fetch_policy.py``); ``transfers``
    gets it unless it has one already."""

    def __init__(self, client: Any, config: RunnerConfig, transfers: Transfers, host_api: str):
        self.client = client
        self.config = config
        if transfers.policy is None:
            transfers.policy = FetchPolicy(host_api, config.allow_egress)
        self.fetch_policy: FetchPolicy = transfers.policy
        self.transfers = transfers
        self.host_api = host_api
        self._running: set[str] = set()  # runs between the start and the end of ``run``
        self._stopping: dict[str, str] = {}  # run id → why it is being stopped
        self._containers: dict[str, Any] = {}
        self._cleaning: set[asyncio.Future[None]] = set()  # removals of finished runs
        self.network = JobNetwork(
            client,
            config.worker_id,
            config.network,
            {LABEL_WORKER: config.worker_id},
            host_api,
            config.allow_egress,
            config.iptables,
        )
        self.egress = self.network.egress

    async def run(self, run: Run, phase: Phases, log: Logs) -> RunResult:
        """Run to the end; never raises for the job's own failures (they are results)."""
        definition = run.definition
        sys_log: Callable[[str], None] = lambda text: log("sys", text)  # noqa: E731
        digest: str | None = None
        folder: RunFolder | None = None
        self._running.add(run.run_id)
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
                any_uid=self.config.container_user == "image",
            )
            if run.run_id in self._stopping:
                return RunResult(Reason.CANCELLED, message=self._stopping[run.run_id])
            container = await asyncio.to_thread(self._create, run, digest, folder)
            self._containers[run.run_id] = container
            result = await self._execute(run, container, folder, phase, log)
            if result.reason in (Reason.SUCCESS, Reason.FAILED):
                phase(Phase.UPLOADING, None)
                result.outputs = await self._upload(folder, container)
            result.image_digest = digest
            return result
        except asyncio.TimeoutError:
            return RunResult(Reason.ERROR, message="pulling or building the image took too long")
        except ImageError as exc:
            return RunResult(Reason.ERROR, message=str(exc))
        except FetchRefused as exc:
            return RunResult(
                Reason.ERROR, message=input_refusal(definition, exc), image_digest=digest
            )
        except TransferError as exc:
            return RunResult(
                Reason.ERROR, message=f"moving a file failed: {exc}", image_digest=digest
            )
        except requests.exceptions.ConnectionError as exc:
            raise RuntimeLost(f"the Docker engine stopped answering ({exc})") from None
        finally:
            self._running.discard(run.run_id)
            self._stopping.pop(run.run_id, None)
            # The result goes to the host now; the exited container and the run folder are
            # removed right after, in the background (``close`` waits for that): their removal
            # (20 to 30 ms) is off every run's time to its result.
            self._clean_later(self._containers.pop(run.run_id, None), folder)

    async def stop(self, run_id: str, why: str = "cancelled") -> None:
        """Stop a run's container: SIGTERM, then SIGKILL after the grace period."""
        if run_id not in self._running:
            return  # ended already: remembering the stop would stop its next attempt here
        self._stopping.setdefault(run_id, why)
        container = self._containers.get(run_id)
        if container is not None:
            await asyncio.to_thread(_stop, container, self.config.cancel_grace)

    def running(self) -> list[str]:
        return list(self._containers)

    async def recovered(self) -> None:
        """Wait until the engine answers again. Its networks may be gone with it (a reset
        engine), so the worker's own is looked up, or made, again at the next run."""
        while True:
            # On a connection of its pool the client may still reach an engine that is shutting
            # down (it serves open connections until it exits): ask on a new one.
            self.client.api.close()
            if await asyncio.to_thread(self._answers):
                break
            await asyncio.sleep(ENGINE_POLL_SECONDS)
        self.network.forget()

    def _answers(self) -> bool:
        try:
            return bool(self.client.ping())
        except Exception:
            return False

    async def close(self) -> None:
        """Wait until the containers and folders of finished runs are removed, then remove the
        worker's network: the engine's address pools are few (about 30 bridge networks), so a
        network left behind by every worker that ever ran would soon stop all containers."""
        while self._cleaning:
            await asyncio.wait(set(self._cleaning))
        name = self.network.take()
        if name is not None and not self._containers:
            await asyncio.to_thread(self.network.remove, name)

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
            return await build_image(self.client, definition.build, log, self.fetch_policy)
        assert definition.image is not None
        return await ensure_image(self.client, definition.image, log)

    def _create(self, run: Run, image: str, folder: RunFolder) -> Any:
        d = run.definition
        cfg = self.config
        z = ",Z" if _selinux() else ""
        any_uid = cfg.container_user == "image"  # then the job's uid may be anyone's
        cache = job_cache(cfg.data_dir / "job-cache", run.queue, cfg.job_cache_bytes, any_uid)
        volumes = {
            str(folder.inputs): {"bind": "/inputs", "mode": "rw" + z},
            str(folder.outputs): {"bind": "/outputs", "mode": "rw" + z},
            str(cache): {"bind": "/job-cache", "mode": "rw" + z},
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
            # What the worker accounts for the run: a job that names no cpus is counted (and
            # scheduled) as 1 CPU, so it gets no more than that either.
            nano_cpus=int(run.allocation.cpus * 1e9) or None,
            mem_limit=memory,
            memswap_limit=memory,
            shm_size=d.shm_size,
            pids_limit=cfg.pids_limit,
            security_opt=["no-new-privileges"],
            # Raw sockets would let a root job forge packets on the bridge (ARP spoofing of the
            # other jobs' traffic); ping works without them (ICMP datagram sockets).
            cap_drop=["NET_RAW"],
            privileged=False,
            user=f"{os.getuid()}:{os.getgid()}" if cfg.container_user == "worker" else None,
            network=self.network.name() if cfg.network != "none" else None,
            network_mode="none" if cfg.network == "none" else None,
            device_requests=[docker_device_request(gpus)] if gpus else None,
            detach=True,
        )

    async def _execute(
        self, run: Run, container: Any, folder: RunFolder, phase: Phases, log: Logs
    ) -> RunResult:
        meter = await asyncio.to_thread(
            DiskMeter,
            folder,
            self.config.data_dir / "job-cache" / run.queue,
            lambda: _layer_size(self.client, container.id),
        )
        loop = asyncio.get_running_loop()
        stream = await asyncio.to_thread(
            self.client.api.attach, container.id, stream=True, logs=True, demux=True
        )
        pump = asyncio.ensure_future(asyncio.to_thread(_pump, stream, loop, log))
        started = int(time.time())
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
        measured = time.monotonic()  # the layer and the job cache, last time
        while not waiter.done():
            done, _ = await asyncio.wait({waiter}, timeout=self.config.output_poll_seconds)
            if done:
                break
            if run.run_id in self._stopping:
                why, message = Reason.CANCELLED, self._stopping[run.run_id]
            elif time.monotonic() > deadline:
                why, message = Reason.TIMED_OUT, f"ran past its limit of {limit} s"
            else:
                slow = time.monotonic() - measured >= self.config.disk_poll_seconds
                if slow:
                    measured = time.monotonic()
                if (message := await self._over_cap(meter, slow)) is not None:
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
        if code in (137, 143) and await self._engine_went_away(container.id, started):
            raise RuntimeLost(
                f"the Docker engine stopped the container (exit {code}) and went away"
            )
        # A job can write past a cap and exit between two samples: check once more (all of
        # it: the exited container's layer is still there) before anything is uploaded.
        if (message := await self._over_cap(meter, True)) is not None:
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

    async def _engine_went_away(self, container_id: str, since: int) -> bool:
        """Whether a container killed by a signal was stopped from outside (no stop of ours
        makes a ``stop`` event) by an engine that then went away: an engine shutting down stops
        every container first. A person's ``docker stop`` leaves the engine up: that stays the
        job's result."""

        def outside_stops() -> list[Any]:
            # The event may follow the container's exit by a moment: wait a second for it.
            until = int(time.time()) + 1
            filters = {"container": container_id, "event": "stop"}
            return list(
                self.client.api.events(since=since, until=until, filters=filters, decode=True)
            )

        try:
            if not await asyncio.to_thread(outside_stops):
                return False
        except requests.exceptions.ConnectionError:
            return True
        deadline = time.monotonic() + ENGINE_SHUTDOWN_SECONDS
        while time.monotonic() < deadline:
            if not await asyncio.to_thread(self._answers):
                return True
            await asyncio.sleep(ENGINE_POLL_SECONDS / 2)
        return False

    async def _over_cap(self, meter: DiskMeter, slow: bool) -> str | None:
        """Why the run must end when it wrote more than a cap (``/outputs``, or everything it
        wrote to the disk), else None."""
        use = await asyncio.to_thread(lambda: meter.sample(slow=slow))
        cfg = self.config
        max_disk = cfg.max_disk_bytes
        if max_disk is None:
            max_disk = cfg.max_output_bytes + DISK_HEADROOM
        return over_caps(use, cfg.max_output_bytes, max_disk)

    async def _upload(self, folder: RunFolder, container: Any) -> dict[str, OutputRef]:
        source = folder.outputs
        if self.config.container_user == "image" and await asyncio.to_thread(
            engine_copy.unreadable, source
        ):  # the job's uid left files this worker (not root) cannot read: the engine can
            source = await self._copy_out(container, folder.root / "outputs-copy")
        outputs = {}
        for path, file in await asyncio.to_thread(lambda: list(output_files(source))):
            key, size = await self.transfers.upload(file)
            outputs[path] = OutputRef(key=key, size=size)
        return outputs

    async def _copy_out(self, container: Any, dest: Path) -> Path:
        cap = self.config.max_output_bytes
        try:
            return await asyncio.to_thread(engine_copy.copy_out, container, dest, cap)
        except engine_copy.CopyError as exc:
            raise TransferError(f"copying /outputs out of the container: {exc}") from exc


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


def _layer_size(client: Any, container_id: str) -> int | None:
    """Bytes in the container's writable layer (``SizeRw``), or None when the engine does not
    say. docker-py's inspect cannot ask for sizes; a listing filtered to the container can."""
    try:
        found = client.api.containers(all=True, size=True, filters={"id": container_id})
    except requests.exceptions.RequestException:
        return None  # an engine that went away is the waiter's to report, not the sampler's
    for entry in found:
        if entry.get("Id") == container_id:
            return int(entry.get("SizeRw") or 0)
    return None


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
