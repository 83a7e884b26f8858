"""The Jupyter server extension: configuration, start and stop of the queue host."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

from jupyter_server.extension.application import ExtensionApp
from traitlets import Bool, Enum, Float, Int, List, Type, Unicode, Union, default

from .._version import __version__
from ..host.blobs.base import BlobStore
from ..host.blobs.local import LocalBlobStore
from ..host.datadir import DataDir, acquire, default_data_dir, host_secret
from ..host.limits import LimitConfig, Limits
from ..host.logs import LogStore
from ..host.service import QueueService, ServiceConfig
from ..host.store.base import Store
from ..host.store.sqlite import SqliteStore
from .local_worker import LocalWorker, docker_reachable
from .websockets import closing_sockets


class ComputeQueueApp(ExtensionApp):
    """Public compute queues, hosted by this Jupyter server under ``{base_url}compute-queue/``."""

    name = "jupyter_compute_queue"
    app_name = "jupyter-compute-queue"
    version = __version__
    description = __doc__
    load_other_extensions = True
    #: Set by ``jupyter compute-queue serve``: print the host's URL once it is up.
    serve_mode = False

    data_dir = Unicode(
        "",
        help="Folder for the queue state (SQLite), logs and local blobs. Default: "
        "<Jupyter data dir>/compute-queue. A second server finds it in use and takes <dir>-2.",
    ).tag(config=True)
    public = Bool(
        False,
        help="Open every queue but 'local' to callers without Jupyter credentials: the queue "
        "name is the secret. Off by default.",
    ).tag(config=True)
    public_url = Unicode(
        "",
        help="The URL people use to reach this server (with its base URL), for links in answers"
        " and on job pages. Default: the URL of each request.",
    ).tag(config=True)
    cache_scope = Enum(
        ["queue", "host"],
        "queue",
        help="Where a finished result is reused: in the same queue only, or ('host') in any "
        "queue of a private host. Public queues never see another queue's results.",
    ).tag(config=True)
    lease_seconds = Float(30.0, help="How long a worker's lease lasts without a heartbeat.").tag(
        config=True
    )
    max_lost = Int(3, help="A run whose worker is lost this many times finishes WorkerLost.").tag(
        config=True
    )
    retention_days = Float(
        30.0, help="Finished runs, their logs and results are deleted this long after last use."
    ).tag(config=True)
    blob_grace_seconds = Float(
        86400.0,
        help="Blobs that no stored job or run refers to are deleted once nobody touched them "
        "for this long (an upload or an existence check touches one).",
    ).tag(config=True)
    callback_attempts = Int(
        10, help="Attempts to deliver a submission's callback before giving it up."
    ).tag(config=True)
    callback_backoff = Float(
        2.0,
        help="Seconds before a failed callback is retried; doubled at each attempt, at most "
        "10 minutes.",
    ).tag(config=True)
    metrics_window = Float(
        3600.0,
        help="Metrics label the queues active within this many seconds (and those with "
        "unfinished runs or connected workers).",
    ).tag(config=True)
    max_log_bytes = Int(
        16 * 1024 * 1024, help="Log bytes kept per run (the head and a rolling tail)."
    ).tag(config=True)
    max_definition_bytes = Int(
        4 * 1024 * 1024, help="The largest job definition accepted (bigger inputs go as blobs)."
    ).tag(config=True)
    max_blob_bytes = Int(10 * 1024**3, help="The largest blob accepted by PUT f/{key}.").tag(
        config=True
    )
    max_batch_size = Int(
        1000, help="The most submissions in one batch (POST q/{queue} with a list); 413 above."
    ).tag(config=True)
    max_submission_bytes = Int(
        64 * 1024 * 1024,
        help="The largest body of a submission (one definition or a whole batch), refused with"
        " 413 before it is read.",
    ).tag(config=True)
    limit_scope = Enum(
        ["public", "all", "off"],
        "public",
        help="Who the caps below apply to: 'public' (callers without Jupyter credentials on a "
        "host in public mode), 'all' (every caller but workers, on any host) or 'off'. Over a "
        "cap the host answers 429 with Retry-After.",
    ).tag(config=True)
    max_queued_runs = Int(1000, help="Cap: runs waiting (Queued) in one queue; 0 for no cap.").tag(
        config=True
    )
    max_submissions_per_minute = Int(
        600, help="Cap: submissions to one queue per minute (bursts up to it); 0 for no cap."
    ).tag(config=True)
    max_blob_bytes_per_client_hour = Int(
        10 * 1024**3,
        help="Cap: blob bytes one client (address, or Jupyter user) uploads per hour; 0 for no "
        "cap.",
    ).tag(config=True)
    max_blob_bytes_per_host_hour = Int(
        50 * 1024**3,
        help="Cap: blob bytes all capped clients together upload per hour; 0 for no cap.",
    ).tag(config=True)
    local_worker = Union(
        [Bool(), Enum(["auto"])],
        default_value="auto",
        help="Run a worker on queue 'local' with this machine's Docker engine: True, False, or "
        "'auto' (only when an engine answers at start).",
    ).tag(config=True)
    local_worker_args = List(
        Unicode(),
        help="Extra options for the local worker, e.g. ['--cpus', '2', '--memory', '8g'].",
    ).tag(config=True)
    store_class = Type(SqliteStore, klass=Store, help="The store of jobs, runs and leases.").tag(
        config=True
    )
    blob_store_class = Type(
        LocalBlobStore,
        klass=BlobStore,
        help="The blob store: local disk, or jupyter_compute_queue.host.blobs.s3.S3BlobStore "
        "(configured as S3BlobStore.bucket, .endpoint_url …).",
    ).tag(config=True)

    @default("data_dir")
    def _default_data_dir(self) -> str:
        return str(default_data_dir())

    def initialize_settings(self) -> None:
        """Own the data dir and build the service; it opens on the first request or at start."""
        self._owned: DataDir = acquire(Path(self.data_dir).expanduser())
        root = self._owned.path
        self.secret = host_secret(root)
        self.service = QueueService(
            self.store_class(root / "state.sqlite"),
            LogStore(root / "logs", max_bytes=self.max_log_bytes),
            cast("type[BlobStore]", self.blob_store_class).from_config(root / "blobs", self),
            ServiceConfig(
                lease_seconds=self.lease_seconds,
                max_lost=self.max_lost,
                retention_days=self.retention_days,
                cache_scope=self.cache_scope,
                max_definition_bytes=self.max_definition_bytes,
                public=self.public,
                blob_grace_seconds=self.blob_grace_seconds,
                callback_attempts=self.callback_attempts,
                callback_backoff=self.callback_backoff,
                metrics_window=self.metrics_window,
            ),
        )
        self.limits = Limits(
            LimitConfig(
                scope=self.limit_scope,
                public=self.public,
                max_queued_runs=self.max_queued_runs,
                max_submissions_per_minute=self.max_submissions_per_minute,
                max_blob_bytes_per_client_hour=self.max_blob_bytes_per_client_hour,
                max_blob_bytes_per_host_hour=self.max_blob_bytes_per_host_hour,
            )
        )
        self._started: asyncio.Task[None] | None = None
        self.worker: LocalWorker | None = None
        self.settings["compute_queue"] = self
        self.log.info("compute-queue: state in %s%s", root, " (public mode)" if self.public else "")

    def initialize_handlers(self) -> None:
        from .handlers import routes

        self.handlers.extend(routes())

    async def ready(self) -> QueueService:
        """The started service (started once, by whichever comes first: a request or start)."""
        if self._started is None:
            self._started = asyncio.ensure_future(self._start())
        await asyncio.shield(self._started)
        return self.service

    async def _start(self) -> None:
        await self.service.store.open()
        await self.service.start()

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        await self.ready()
        await self.start_local_worker(serverapp)
        if self.serve_mode:
            url = serverapp.connection_url.rstrip("/") + "/compute-queue/"
            token = serverapp.identity_provider.token
            print(f"compute-queue host: {url}", flush=True)
            if token:
                print(f"token: {token}", flush=True)

    async def start_local_worker(self, serverapp: Any) -> None:
        """Start the supervised local worker if configured (or "auto" and Docker answers)."""
        wanted = self.local_worker
        if wanted == "auto":
            wanted = await asyncio.to_thread(docker_reachable)
            if not wanted:
                self.log.info("compute-queue: no Docker engine answers, so no local worker")
        if wanted and self.worker is None:
            self.worker = LocalWorker(
                serverapp.connection_url,
                serverapp.identity_provider.token or None,
                self._owned.path / "local-worker",
                list(self.local_worker_args),
            )
            self.worker.start()

    async def stop_extension(self) -> None:
        """Stop the sweepers, close the store, release the data dir."""
        if self.worker is not None:
            await self.worker.stop()
        if self._started is not None:
            await asyncio.shield(self._started)
            await self.service.stop()
            await closing_sockets()  # their last writes go before the store closes
            await self.service.store.close()
            await self.service.blobs.close()
        self.service.logs.close()
        self._owned.release()

    def current_activity(self) -> bool:
        """True while runs are queued or running, so an idle culler leaves the server up."""
        return self.service.active_runs > 0
