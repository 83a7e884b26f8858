"""Where the worker itself may connect for a job: the same destinations as the job's network.

A job names URLs the worker fetches on its own machine, not in the container: ``url`` inputs and
``configFiles`` (SPEC §2) and a build's ``context``. Unchecked, a job could have the worker read
the cloud metadata service (169.254.169.254), the Docker API on 127.0.0.1:2375 or a LAN admin
page for it, and find the answer in ``/inputs``. So those connections follow the policy of the
jobs' own network (``egress.py``), checked on the address actually connected to, at connect
time, on every redirect hop: the name is resolved once, every address it gives is checked, and
the connection goes to a checked one (no second lookup a DNS server could answer differently).

Refused: loopback (127.0.0.0/8, ``::1``); the egress module's ranges (private, shared,
link-local); the subnets the machine is directly connected to and its own addresses;
unspecified, multicast and reserved addresses; IPv6 unique local (``fc00::/7``), link-local
(``fe80::/10``) and site-local (``fec0::/10``) addresses; and IPv6 forms that carry a refused
IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``).

Allowed all the same: the host's API address and port (the worker talks to it anyway), and what
the operator opened with ``--allow-egress`` (the same :class:`~.egress.Allowed` values as for
jobs). ``--network`` changes nothing here: it is about the jobs' containers, while these
connections are the worker's own. Unlike the egress rules this needs no root, so it always
applies.

Not checked (not job-given): the worker's requests to the host, a ``key`` input's download (a
URL the host gave, and bytes that must hash to a blob the host already has), and the hop after
a redirect issued by the host's blob routes (``f/{key}`` and a job's ``outputs/{path}``, which
redirect only to the host's own blob store, such as a presigned S3 URL).
"""

from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import ssl
import sys
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

from ..client.http import origin, safe, under_api
from ..model.jobs import DataRefType, JobDefinition
from .egress import BLOCKED_RANGES, Allowed, connected_subnets

__all__ = [
    "FetchPolicy",
    "FetchRefused",
    "Machine",
    "checked_opener",
    "from_blob_store",
    "input_refusal",
    "open_connection",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: IPv4 "this network" (RFC 1122): 0.0.0.0 itself reaches the machine's own services.
_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")
#: NAT64's well-known prefix (RFC 6052): the last 32 bits are the IPv4 address reached.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
#: A route the kernel marks local (an address of this machine) in ``/proc/net/ipv6_route``.
_RTF_LOCAL = 0x80000000
_RTF_GATEWAY = 0x0002
#: The host routes that redirect only to the host's blob store (``send_blob``): ``f/{key}``
#: and a job's ``outputs/{path}``. Not ``inputs/{path}``: for a ``url`` input it redirects to
#: whatever URL that job gave.
_STORE_ROUTES = re.compile(r"f/[^/]+|(?:q/[^/]+/)?j/[^/]+/outputs/.+")


class FetchRefused(Exception):
    """The policy refused a destination. ``reason`` says why ("169.254.169.254 is a link-local
    address; …"); ``url`` is the URL of the refused hop and ``requested`` the one the job gave
    (they differ after a redirect), both filled in by the caller that knows them."""

    def __init__(self, reason: str, url: str | None = None, requested: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.url = url
        self.requested = requested

    def __str__(self) -> str:
        if self.url is None:
            return self.reason
        if self.requested is not None and safe(self.requested) != self.url:
            return (
                f"{safe(self.requested)} redirected to {self.url}, which the worker does not "
                f"fetch: {self.reason}"
            )
        return f"the worker does not fetch {self.url}: {self.reason}"


@dataclass(frozen=True)
class Machine:
    """What of this machine's own networks a fetch may not reach: the subnets it is directly
    connected to (its LAN, its bridges, even when their addresses are public) and its own
    addresses (a public address on a ``/32`` is in no connected subnet)."""

    connected: tuple[IPNetwork, ...] = ()
    addresses: frozenset[IPAddress] = frozenset()

    @classmethod
    def read(cls, proc: str = "/proc/net") -> Machine:
        """The machine's networks now, from the kernel's routing tables (nothing when they
        cannot be read)."""
        connected: list[IPNetwork] = list(connected_subnets(f"{proc}/route"))
        addresses: set[IPAddress] = set(_local_ipv4(f"{proc}/fib_trie"))
        try:
            lines = Path(f"{proc}/ipv6_route").read_text().splitlines()
        except OSError:
            lines = []
        for line in lines:
            fields = line.split()
            if len(fields) != 10:
                continue
            try:
                network = ipaddress.IPv6Network(
                    (int(fields[0], 16), int(fields[1], 16)), strict=False
                )
                gateway, flags = int(fields[4], 16), int(fields[8], 16)
            except ValueError:
                continue
            if flags & _RTF_LOCAL and network.prefixlen == 128:
                addresses.add(network.network_address)
            elif not (gateway or flags & _RTF_GATEWAY or fields[9] == "lo") and (
                network.prefixlen and not network.is_multicast
            ):
                connected.append(network)
        return cls(tuple(connected), frozenset(addresses))


def _local_ipv4(fib_trie: str) -> Iterable[ipaddress.IPv4Address]:
    """The machine's own IPv4 addresses: the ``/32 host LOCAL`` leaves of its FIB."""
    try:
        lines = Path(fib_trie).read_text().splitlines()
    except OSError:
        return
    previous = ""
    for line in lines:
        text = line.strip()
        if text.startswith("|--"):
            previous = text[3:].strip()
        elif text == "/32 host LOCAL" and previous:
            try:
                yield ipaddress.IPv4Address(previous)
            except ValueError:
                continue


@dataclass
class FetchPolicy:
    """The destinations a worker connects to for a job's URLs (module docstring).

    ``host_api``: the host's API URL (its address and port stay allowed); ``allowed``: the
    operator's ``--allow-egress``; ``machine``: the machine's networks, or None to read them
    at each check (a Docker network made later is a new connected subnet)."""

    host_api: str | None = None
    allowed: tuple[Allowed, ...] = ()
    machine: Machine | None = None
    #: ``socket.getaddrinfo``, or a stand-in for tests.
    resolve: Callable[..., list[Any]] = field(default=socket.getaddrinfo, repr=False)

    # --- checking -------------------------------------------------------------------------

    def refusal(self, address: str, port: int, name: str | None = None) -> str | None:
        """Why ``address:port`` (an IP address) is refused, or None; ``name``: the host name
        it was resolved from, for the message."""
        text = address.split("%", 1)[0]  # an IPv6 scope is not needed
        ip = ipaddress.ip_address(text)
        v4 = _carried_ipv4(ip)
        subject: IPAddress = v4 if v4 is not None else ip
        if self._opened(subject, port):
            return None
        why = _special(subject) or self._on_machine(subject)
        if why is None:
            return None
        shown = f"{text} (IPv4 {subject})" if subject != ip else text
        if isinstance(subject, ipaddress.IPv4Address):
            hint = f"a worker opens it with --allow-egress {subject}:{port}"
        else:
            hint = "--allow-egress opens IPv4 destinations only"
        if name is not None and not _is_address(name):
            return f"{name} resolves to {shown}, which is {why}; {hint}"
        return f"{shown} is {why}; {hint}"

    def _opened(self, ip: IPAddress, port: int) -> bool:
        if isinstance(ip, ipaddress.IPv4Address) and any(
            ip in a.network and a.port in (None, port) for a in self.allowed
        ):
            return True
        return self._is_host_api(ip, port)

    def _is_host_api(self, ip: IPAddress, port: int) -> bool:
        if self.host_api is None:
            return False
        parts = urlsplit(self.host_api)
        _, host, api_port = origin(parts)
        if port != api_port:
            return False
        try:
            infos = self.resolve(host, api_port, 0, socket.SOCK_STREAM)
        except OSError:
            return False
        for *_, sockaddr in infos:
            found = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            if (_carried_ipv4(found) or found) == ip:
                return True
        return False

    def _on_machine(self, ip: IPAddress) -> str | None:
        machine = self.machine if self.machine is not None else Machine.read()
        if ip in machine.addresses:
            return "an address of this machine"
        for network in machine.connected:
            if ip.version == network.version and ip in network:
                return f"on a network this machine is directly connected to ({network})"
        return None

    # --- connecting -----------------------------------------------------------------------

    def connect(
        self,
        host: str,
        port: int,
        timeout: Any = socket._GLOBAL_DEFAULT_TIMEOUT,  # type: ignore[attr-defined]
        source_address: tuple[str, int] | None = None,
    ) -> socket.socket:
        """A TCP connection to ``host:port`` at an address the policy allows: the name is
        resolved once and only checked addresses are tried, in the resolver's order.
        FetchRefused when the name gives none; the last connection error when none answers."""
        infos = self.resolve(host, port, 0, socket.SOCK_STREAM)
        refused: str | None = None
        error: OSError | None = None
        for family, kind, proto, _, sockaddr in infos:
            why = self.refusal(str(sockaddr[0]), port, host)
            if why is not None:
                refused = refused or why
                continue
            sock = socket.socket(family, kind, proto)
            try:
                if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:  # type: ignore[attr-defined]
                    sock.settimeout(timeout)
                if source_address is not None:
                    sock.bind(source_address)
                sock.connect(sockaddr)  # the checked address itself, not the name again
                return sock
            except OSError as exc:
                sock.close()
                error = exc
        if error is not None:
            raise error
        if refused is not None:
            raise FetchRefused(refused)
        raise OSError(f"{host} resolves to no address")


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _carried_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, NAT64, 6to4), if any."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def _special(ip: IPAddress) -> str | None:
    """Why an address is refused whatever the machine, or None."""
    if ip.is_loopback:
        return "a loopback address"
    if isinstance(ip, ipaddress.IPv4Address):
        if ip in _THIS_NETWORK:
            return "an unspecified address"
        for network in BLOCKED_RANGES:
            if ip in network:
                if ip.is_link_local:
                    return "a link-local address"
                if ip.is_private:
                    return "a private address"
                return f"a shared (carrier-grade NAT) address ({network})"
    else:
        if ip.is_unspecified:
            return "an unspecified address"
        if ip.is_link_local:
            return "a link-local address"
        if ip.is_site_local:
            return "a site-local address"
        if ip in ipaddress.IPv6Network("fc00::/7"):
            return "a unique local (private) address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_reserved:
        return "a reserved address"
    return None


def input_refusal(definition: JobDefinition, refused: FetchRefused) -> str:
    """A run's error message: the inputs that gave the refused URL, the URL, and why."""
    names = [
        f"{field_name}.{path}"
        for field_name, path, ref in definition.data_refs()
        if ref.type is DataRefType.URL and str(ref.value) == refused.requested
    ]
    return f"{', '.join(names) or 'a url input'}: {refused}"


def from_blob_store(split: SplitResult, api: SplitResult) -> bool:
    """Whether a redirect from ``split`` was issued by one of the host's blob routes, which
    send only to the host's blob store (a presigned URL), never to a URL a job gave. A path
    with dot segments is not taken for one: a proxy in front of the host could resolve
    ``outputs/../inputs/…`` to the inputs route."""
    if not under_api(split, api):
        return False
    route = split.path[len(api.path) :]
    if any(part in (".", "..") for part in unquote(route).split("/")):
        return False
    return _STORE_ROUTES.fullmatch(route) is not None


# --- http.client and urllib ---------------------------------------------------------------


class _Checked(http.client.HTTPConnection):
    """Connects through :meth:`FetchPolicy.connect` (no proxy tunnel: none is used)."""

    policy: FetchPolicy
    url: str

    def connect(self) -> None:
        sys.audit("http.client.connect", self, self.host, self.port)
        source = getattr(self, "source_address", None)  # set by __init__; not in the stubs
        try:
            self.sock = self.policy.connect(self.host, self.port, self.timeout, source)
        except FetchRefused as exc:
            exc.url = safe(self.url)
            raise
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _CheckedHTTP(_Checked):
    pass


class _CheckedHTTPS(http.client.HTTPSConnection, _Checked):
    """``HTTPSConnection.connect`` calls ``super().connect()``: :class:`_Checked`'s."""


def open_connection(
    policy: FetchPolicy | None,
    url: str,
    timeout: float | None = None,
    context: ssl.SSLContext | None = None,
) -> http.client.HTTPConnection:
    """An ``http.client`` connection (not yet connected) to the host and port of ``url``; with
    ``policy`` its socket is opened by :meth:`FetchPolicy.connect`, and a refusal names
    ``url``."""
    scheme, host, port = origin(urlsplit(url))
    if policy is None:
        if scheme == "https":
            return http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
        return http.client.HTTPConnection(host, port, timeout=timeout)
    conn: _Checked
    if scheme == "https":
        conn = _CheckedHTTPS(host, port, timeout=timeout, context=context)
    else:
        conn = _CheckedHTTP(host, port, timeout=timeout)
    conn.policy, conn.url = policy, url
    return conn


class _CheckedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: FetchPolicy) -> None:
        super().__init__()
        self.policy = policy

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        def connection(host: str, timeout: float | None = None) -> http.client.HTTPConnection:
            return open_connection(self.policy, req.full_url, timeout)

        return self.do_open(connection, req)  # type: ignore[arg-type]


class _CheckedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: FetchPolicy) -> None:
        super().__init__()
        self.policy = policy

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        def connection(
            host: str, timeout: float | None = None, context: ssl.SSLContext | None = None
        ) -> http.client.HTTPConnection:
            return open_connection(self.policy, req.full_url, timeout, context)

        return self.do_open(connection, req)  # type: ignore[arg-type]


def checked_opener(policy: FetchPolicy) -> urllib.request.OpenerDirector:
    """A ``urllib`` opener whose every connection, redirects included, goes through
    ``policy``: http and https only (no ``file:``, no ``ftp:`` a redirect could name) and no
    proxy (``HTTP_PROXY``, whose ``no_proxy`` would connect past the check)."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        _CheckedHTTPHandler(policy),
        _CheckedHTTPSHandler(policy),
        urllib.request.HTTPRedirectHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
        urllib.request.UnknownHandler(),
    ):
        opener.add_handler(handler)
    return opener
