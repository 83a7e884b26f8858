"""Egress rules for a worker's Docker network: what a job's container may not reach (SPEC §6).

A container on a Docker bridge network reaches everything the machine reaches: the machine
itself (any service bound to ``0.0.0.0``, through the bridge's gateway address or any other
address of the machine; even on an ``internal`` network, measured on engine 20.10), its LAN,
and the cloud metadata service at 169.254.169.254. A worker running as root closes that with
iptables rules in the engine's filter table:

* ``DOCKER-USER`` (the chain the engine leaves to its users; it sees forwarded traffic, not the
  machine's own): a jump, for traffic coming in from the worker's bridge, to ``CQ-<hash>-FWD``,
  which refuses private (RFC 1918), shared (RFC 6598) and link-local ranges and the subnets the
  machine is directly connected to (its LAN, even when its addresses are public);
* ``INPUT`` (traffic to the machine's own addresses never passes ``DOCKER-USER``): a jump to
  ``CQ-<hash>-IN``, which refuses everything.

Both chains first let replies through (established/related) and what jobs need: DNS to the
resolvers the engine forwards to (Docker's embedded resolver sends a container's queries from
the container's own namespace, so they cross these chains, and a resolver is usually a private
address), the host API when its address is private (jobs get ``JOB_URL``), and what the operator
allowed (``--allow-egress``). They refuse with REJECT, not DROP: a job's connection fails at once
("No route to host") instead of hanging until its timeout.

Each worker owns its two chains (named by a hash of its id) and its two jump rules (commented
with its id). Installing first removes whatever an earlier process of the same worker left (a
crash or SIGKILL); removing happens when the worker removes its network. Rules of other workers
are never touched, as with containers.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

__all__ = [
    "BLOCKED_RANGES",
    "Allowed",
    "Egress",
    "EgressUnavailable",
    "blocked",
    "connected_subnets",
    "needed_by_jobs",
    "parse_allowed",
]

IPv4Network = ipaddress.IPv4Network

#: Refused for every job: private (RFC 1918), shared/CGNAT (RFC 6598: also some clouds' metadata,
#: e.g. 100.100.100.200) and link-local (RFC 3927: 169.254.169.254, the cloud metadata service).
BLOCKED_RANGES: tuple[IPv4Network, ...] = tuple(
    ipaddress.IPv4Network(cidr)
    for cidr in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16")
)
#: The engine's chain for its users' rules of forwarded traffic.
DOCKER_USER = "DOCKER-USER"
#: Waiting for the xtables lock (iptables-legacy; dockerd takes it too); nft ignores it.
LOCK_WAIT = "10"
TIMEOUT = 30.0
_REJECT = ["-j", "REJECT", "--reject-with", "icmp-admin-prohibited"]
_REPLIES = ["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "RETURN"]
#: What iptables says when a chain or rule to remove is not there (nft and legacy).
_MISSING = ("No chain", "does not exist", "Bad rule")
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.@-]{1,200}$")
_RESOLV_CONFS = ("/etc/resolv.conf", "/run/systemd/resolve/resolv.conf")
_DAEMON_JSON = "/etc/docker/daemon.json"


class EgressUnavailable(Exception):
    """The rules cannot be installed; the message says why (the worker then warns)."""


@dataclass(frozen=True)
class Allowed:
    """A destination jobs may reach although it lies in a refused range: a network, and a port
    (TCP and UDP) or every port (``None``)."""

    network: IPv4Network
    port: int | None = None

    def __str__(self) -> str:
        return f"{self.network}" + (f":{self.port}" if self.port is not None else "")

    def matches(self) -> list[list[str]]:
        """The iptables matches of this destination, one list per rule."""
        if self.port is None:
            return [["-d", str(self.network)]]
        return [
            ["-d", str(self.network), "-p", proto, "--dport", str(self.port)]
            for proto in ("tcp", "udp")
        ]


def parse_allowed(text: str) -> Allowed:
    """``ADDRESS``, ``CIDR``, ``ADDRESS:PORT`` or ``CIDR:PORT`` (IPv4) as an :class:`Allowed`;
    ValueError saying what is accepted."""
    address, colon, port_text = text.strip().partition(":")
    try:
        network = ipaddress.IPv4Network(address, strict=False)
        port = int(port_text) if colon else None
        if port is not None and not 0 < port < 65536:
            raise ValueError(port)
    except ValueError:
        raise ValueError(
            f"--allow-egress {text!r}: give an IPv4 address or network, optionally with a port,"
            " like 10.0.0.5, 10.1.0.0/16 or 10.0.0.5:3128"
        ) from None
    return Allowed(network, port)


def connected_subnets(route_table: str = "/proc/net/route") -> list[IPv4Network]:
    """The IPv4 subnets the machine reaches without a gateway (its LAN, its bridges)."""
    subnets = []
    try:
        lines = Path(route_table).read_text().splitlines()[1:]
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) < 8 or int(fields[2], 16) != 0 or int(fields[1], 16) == 0:
            continue  # via a gateway, or the default route
        # The kernel prints addresses as integers in its own byte order.
        destination = socket.inet_ntoa(struct.pack("=I", int(fields[1], 16)))
        mask = socket.inet_ntoa(struct.pack("=I", int(fields[7], 16)))
        subnets.append(ipaddress.IPv4Network(f"{destination}/{mask}", strict=False))
    return subnets


def blocked(connected: Iterable[IPv4Network] = ()) -> list[IPv4Network]:
    """The refused ranges, plus the connected subnets that are not inside one already."""
    ranges = list(BLOCKED_RANGES)
    for subnet in connected:
        if not any(subnet.subnet_of(r) for r in ranges):
            ranges.append(subnet)
    return ranges


def needed_by_jobs(host_api: str) -> list[Allowed]:
    """What jobs must still reach even inside a refused range: the engine's DNS resolvers
    (port 53) and the host API (its port). Loopback addresses are left out: a container's
    loopback is its own."""
    needed: list[Allowed] = []
    for resolver in _resolvers():
        needed.append(Allowed(ipaddress.IPv4Network(resolver), 53))
    parts = urlsplit(host_api)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parts.hostname or "", port, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        infos = []
    for *_, sockaddr in infos:
        needed.append(Allowed(ipaddress.IPv4Network(sockaddr[0]), port))
    unique = dict.fromkeys(a for a in needed if not a.network.is_loopback)
    return list(unique)


def _resolvers() -> list[str]:
    """The IPv4 name servers the engine forwards containers' queries to: the daemon's ``dns``
    setting, else the machine's resolv.conf (and systemd-resolved's upstream list)."""
    found: list[str] = []
    with contextlib.suppress(OSError, ValueError, AttributeError):
        found = [str(s) for s in json.loads(Path(_DAEMON_JSON).read_text()).get("dns", [])]
    for path in _RESOLV_CONFS:
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        found += re.findall(r"^\s*nameserver\s+(\S+)", text, re.MULTILINE)
    servers = []
    for server in found:
        try:
            servers.append(str(ipaddress.IPv4Address(server)))
        except ValueError:
            continue  # IPv6: the worker's networks have no IPv6
    return servers


class Egress:
    """The egress rules of one worker (by id), installed for its bridge interface."""

    def __init__(self, worker_id: str, iptables: str | None = None) -> None:
        """``iptables``: the program to use; ``None`` finds the one whose tables hold the
        engine's ``DOCKER-USER`` chain (``iptables``, else ``iptables-nft``/``-legacy``)."""
        digest = hashlib.sha256(worker_id.encode()).hexdigest()[:12]
        self.worker_id = worker_id
        self.forward_chain = f"CQ-{digest}-FWD"
        self.input_chain = f"CQ-{digest}-IN"
        # The tag identifies the jump rules for people reading `iptables -S`; the chain name
        # they jump to is what the code matches.
        shown = worker_id if _SAFE_ID.match(worker_id) else digest
        self.tag = f"compute-queue worker {shown}"
        self._wanted = iptables
        self._program: str | None = None

    # --- installing and removing ----------------------------------------------------------

    def install(
        self,
        interface: str,
        allowed: Sequence[Allowed] = (),
        connected: Iterable[IPv4Network] | None = None,
    ) -> None:
        """Refuse what jobs on bridge ``interface`` may not reach except ``allowed`` (replacing
        the rules this worker left before); EgressUnavailable saying why when this cannot be
        done. ``connected``: the machine's connected subnets (default: its routing table)."""
        program = self._find()
        self._remove(program)
        ranges = blocked(connected_subnets() if connected is None else connected)
        allow = [[*match, "-j", "RETURN"] for a in allowed for match in a.matches()]
        forward = [_REPLIES, *allow, *(["-d", str(r), *_REJECT] for r in ranges)]
        incoming = [_REPLIES, *allow, _REJECT]
        try:
            for chain, rules, parent in (
                (self.forward_chain, forward, DOCKER_USER),
                (self.input_chain, incoming, "INPUT"),
            ):
                self._run("-N", chain)
                for rule in rules:
                    self._run("-A", chain, *rule)
                # The jump comes last, once the chain is whole.
                comment = ["-m", "comment", "--comment", self.tag]
                self._run("-I", parent, "1", "-i", interface, *comment, "-j", chain)
        except EgressUnavailable:
            # All or nothing (a kernel without the conntrack match, say): half the rules would
            # contradict the warning the worker gives instead.
            self._remove(program)
            raise

    def remove(self) -> None:
        """Remove this worker's rules, if any; quiet when there are none or iptables is not
        usable (then there are none either)."""
        with contextlib.suppress(EgressUnavailable):
            self._remove(self._find())

    def installed(self) -> dict[str, list[str]]:
        """This worker's jump rules by parent chain, as ``iptables -S`` prints them."""
        program = self._find()
        return {
            parent: [shlex.join(rule) for rule in self._jumps(program, parent)]
            for parent in (DOCKER_USER, "INPUT")
        }

    def _remove(self, program: str) -> None:
        for parent in (DOCKER_USER, "INPUT"):
            for rule in self._jumps(program, parent):
                self._run("-D", *rule[1:], program=program, missing_ok=True)
        for chain in (self.forward_chain, self.input_chain):
            self._run("-F", chain, program=program, missing_ok=True)
            self._run("-X", chain, program=program, missing_ok=True)

    def _jumps(self, program: str, parent: str) -> list[list[str]]:
        """The rules of ``parent`` that jump to one of this worker's chains, split as
        ``iptables -S`` prints them (``-A PARENT …``)."""
        listing = self._run("-S", parent, program=program)
        rules = []
        for line in listing.splitlines():
            words = shlex.split(line)
            if words[:1] != ["-A"] or "-j" not in words:
                continue
            target = words[words.index("-j") + 1]
            if target in (self.forward_chain, self.input_chain):
                rules.append(words)
        return rules

    # --- running iptables -----------------------------------------------------------------

    def _find(self) -> str:
        """The iptables program that holds the engine's chain; EgressUnavailable otherwise."""
        if self._program is not None:
            return self._program
        if os.geteuid() != 0:
            raise EgressUnavailable("the worker does not run as root (iptables needs root)")
        names = [self._wanted] if self._wanted else ["iptables", "iptables-nft", "iptables-legacy"]
        failures = []
        for name in names:
            program = _which(name)
            if program is None:
                continue
            try:
                self._run("-S", DOCKER_USER, program=program)
            except EgressUnavailable as exc:
                failures.append(str(exc))
                continue
            self._program = program
            return program
        if not failures:
            raise EgressUnavailable(
                f"no iptables program was found ({', '.join(names)}): install iptables"
            )
        raise EgressUnavailable(
            f"the engine's {DOCKER_USER} chain was not found ({'; '.join(failures)}): the Docker"
            " engine runs with --iptables=false, or with another firewall backend"
        )

    def _run(self, *args: str, program: str | None = None, missing_ok: bool = False) -> str:
        """Run iptables on the filter table; its output, or EgressUnavailable with its error."""
        argv = [program or self._find(), "-w", LOCK_WAIT, *args]
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=TIMEOUT, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EgressUnavailable(f"{shlex.join(argv)} failed: {exc}") from None
        if done.returncode != 0:
            error = " ".join(
                line for line in done.stderr.splitlines() if not line.startswith("#")
            ).strip()
            if missing_ok and any(s in error for s in _MISSING):
                return ""
            raise EgressUnavailable(
                f"{shlex.join(argv)} failed with exit code {done.returncode}"
                + (f" ({error})" if error else "")
            )
        return done.stdout


def _which(name: str) -> str | None:
    """``name`` on PATH, else in the sbin folders a non-login root shell may lack on PATH."""
    if os.sep in name:
        return name if os.access(name, os.X_OK) else None
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
