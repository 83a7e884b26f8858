"""The worker's own Docker network for its jobs, and the egress rules that come with it.

Moved out of ``docker_runner.py``: made once per worker (runs starting together would each make
one, and the engine accepts two networks of one name, after which every container start fails
as ambiguous), looked up again after an engine restart, removed when the worker closes.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from .egress import Allowed, Egress, EgressUnavailable, needed_by_jobs

__all__ = ["JobNetwork"]

logger = logging.getLogger(__name__)


class JobNetwork:
    """``mode`` ``bridge`` or ``internal`` (``--network``); ``labels`` go on the network."""

    def __init__(
        self,
        client: Any,
        worker_id: str,
        mode: str,
        labels: dict[str, str],
        host_api: str,
        allow_egress: tuple[Allowed, ...],
        iptables: str | None,
    ) -> None:
        self.client = client
        self.worker_id = worker_id
        self.mode = mode
        self.labels = labels
        self.host_api = host_api
        self.allow_egress = allow_egress
        self.egress = Egress(worker_id, iptables)
        self._name: str | None = None
        self._lock = threading.Lock()

    def forget(self) -> None:
        """The engine may have lost it (a reset engine): look it up, or make it, again."""
        with self._lock:
            self._name = None

    def take(self) -> str | None:
        """The network's name, if one was made, now no longer this object's to use."""
        with self._lock:
            name, self._name = self._name, None
        return name

    def name(self) -> str:
        """The worker's own bridge network, made once: no traffic between its containers, and
        with ``internal`` no route out at all."""
        # Runs create containers from several threads at once, and the engine accepts two
        # networks of one name (which then makes every container start fail as ambiguous).
        with self._lock:
            if self._name is None:
                internal = self.mode == "internal"
                name = f"compute-queue-{self.worker_id}{'-internal' if internal else ''}"
                # The engine's name filter also matches longer names ("…-w1" finds "…-w10").
                found = [n for n in self.client.networks.list(names=[name]) if n.name == name]
                network = (
                    found[0]
                    if found
                    else self.client.networks.create(
                        name,
                        driver="bridge",
                        internal=internal,
                        check_duplicate=True,
                        options={"com.docker.network.bridge.enable_icc": "false"},
                        labels=self.labels,
                    )
                )
                self._restrict_egress(name, network)
                self._name = name
            return self._name

    def _restrict_egress(self, name: str, network: Any) -> None:
        """Install the worker's egress rules for its network (replacing a crashed process's),
        or warn, once, saying what jobs can reach and how to close it. Never raises: jobs run
        either way."""
        attrs: dict[str, Any] = getattr(network, "attrs", None) or {}
        gateway = ((attrs.get("IPAM") or {}).get("Config") or [{}])[0].get("Gateway", "?")
        options = attrs.get("Options") or {}
        interface = options.get("com.docker.network.bridge.name") or (
            f"br-{attrs['Id'][:12]}" if attrs.get("Id") else None
        )
        allowed = [*self.allow_egress, *needed_by_jobs(self.host_api)]
        try:
            if interface is None:
                raise EgressUnavailable("the engine did not say which bridge the network uses")
            self.egress.install(interface, allowed)
            logger.info(
                "compute-queue worker: jobs on network %s cannot reach this machine, its LAN or"
                " private and link-local addresses (iptables chains %s, %s); allowed: %s",
                name,
                self.egress.forward_chain,
                self.egress.input_chain,
                ", ".join(map(str, allowed)) or "nothing",
            )
            return
        except EgressUnavailable as exc:
            why = str(exc)
        reach = f"this machine's own services (through the gateway {gateway} or any address of it)"
        others = "--network none (no network at all)"
        if self.mode == "bridge":
            reach += ", its LAN, and private and link-local addresses like 169.254.169.254"
            others = f"--network internal (no route off this machine) or {others}"
        logger.warning(
            "compute-queue worker: jobs on network %s can reach %s: the worker cannot refuse"
            " that traffic because %s. Run the worker as root where the Docker engine manages"
            " iptables (the worker then adds its rules to the engine's DOCKER-USER chain and to"
            ' INPUT; docs/worker.md, "Isolation", lists them to add by hand), or use %s.',
            name,
            reach,
            why,
            others,
        )

    def remove(self, name: str) -> None:
        for attempt in range(10):
            try:
                for network in self.client.networks.list(names=[name]):
                    if network.name == name:  # the name filter also matches longer names
                        network.remove()
                # Only once the network is gone: a container that outlived its run keeps them.
                self.egress.remove()
                return
            except Exception as exc:  # the engine may still release a removed container's
                if attempt == 9:  # endpoint; else in use (a container outlived its run)
                    logger.warning("compute-queue worker: network %s left behind: %s", name, exc)
                time.sleep(0.2)
