"""Callbacks of submissions (SPEC §11): checking them at submit, sending them afterwards.

A submission's ``callbacks`` (``{"queued": url, "finished": url}``) are stored with it; the
store makes a ``finished`` one due in the transaction that finishes its run. The
:class:`CallbackSender` task POSTs due ones (``{jobId, runId, queue, namespace, state,
reason}``), retries failures with exponential backoff and forgets them once sent or given up.
Nothing here can block or fail a job: a callback lives in its own table and its own task.
Delivery is at least once: one cut short by a stop is sent again after the restart.

In public mode a callback must be ``https`` to a host whose every address is public; the check
is made at submit (a 400 naming the field) and again at each call, by the resolver the HTTP
client connects through, so a name that later resolves to a private address (DNS rebinding)
reaches nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import logging
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from tornado.httpclient import HTTPRequest
from tornado.netutil import Resolver
from tornado.simple_httpclient import SimpleAsyncHTTPClient

from .._version import __version__
from .service_base import BadRequest, ServiceConfig
from .store.base import DueCallback, Store

__all__ = ["CallbackSender", "RefusedAddress", "check_callbacks", "is_public_address"]

log = logging.getLogger(__name__)

EVENTS = ("queued", "finished")
MAX_URL = 2048
#: Callbacks sent at once; a slow receiver holds one slot, not the others.
MAX_IN_FLIGHT = 16
#: Due callbacks read per look at the store.
_BATCH = 100
_DEFAULT_PORTS = {"http": 80, "https": 443}


class RefusedAddress(Exception):
    """A callback's host resolves to an address this host may not call (public mode)."""


def is_public_address(address: str) -> bool:
    """Whether an IP address is on the public internet (not loopback, private, link-local,
    multicast, reserved …); an IPv4-mapped IPv6 address is judged by its IPv4 address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


#: Callback hosts are resolved in threads of their own, with a time limit: a name server that
#: never answers must not hold the event loop's default pool, which blob and log reads share
#: (a stranger could otherwise stall downloads by submitting callbacks to such names).
_RESOLVER_POOL = ThreadPoolExecutor(4, thread_name_prefix="cq-callback-dns")
RESOLVE_TIMEOUT = 5.0


async def _public_addresses(host: str, port: int, family: int = socket.AF_UNSPEC) -> list[Any]:
    """getaddrinfo for ``host``; RefusedAddress unless every address is public."""
    lookup = functools.partial(socket.getaddrinfo, host, port, family, socket.SOCK_STREAM)
    try:
        infos = await asyncio.wait_for(
            asyncio.get_running_loop().run_in_executor(_RESOLVER_POOL, lookup), RESOLVE_TIMEOUT
        )
    except asyncio.TimeoutError:
        raise OSError(f"no answer in {RESOLVE_TIMEOUT:g} s") from None
    addresses = {str(info[4][0]) for info in infos}
    refused = sorted(a for a in addresses if not is_public_address(a))
    if refused or not infos:
        raise RefusedAddress(
            f"{host} resolves to {', '.join(refused) or 'nothing'}, not a public address"
        )
    return infos


class PublicResolver(Resolver):
    """Tornado's resolver for callbacks in public mode: the addresses it returns are the
    ones connected to, so checking them here leaves no gap between check and use."""

    async def resolve(
        self, host: str, port: int, family: socket.AddressFamily = socket.AF_UNSPEC
    ) -> list[tuple[int, Any]]:
        infos = await _public_addresses(host, port, family)
        return [(info[0], info[4]) for info in infos]


async def check_callbacks(value: Any, public: bool, where: str = "") -> dict[str, str]:
    """A submission's ``callbacks`` as ``{event: url}``; BadRequest naming the field if not
    valid (in public mode: not https, or a host that does not resolve to public addresses)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f'{where}callbacks: expected {{"queued": URL, "finished": URL}}')
    checked: dict[str, str] = {}
    for event, url in value.items():
        name = f"{where}callbacks.{event}"
        if event not in EVENTS:
            raise BadRequest(f"{name}: unknown event; callbacks are 'queued' and 'finished'")
        if url is None:
            continue
        if not isinstance(url, str) or len(url) > MAX_URL:
            raise BadRequest(f"{name}: expected a URL of at most {MAX_URL} characters")
        try:
            split = urlsplit(url)
            port = split.port or _DEFAULT_PORTS.get(split.scheme, 0)
        except ValueError as exc:
            raise BadRequest(f"{name}: {exc}") from None
        if split.scheme not in _DEFAULT_PORTS or not split.hostname:
            raise BadRequest(f"{name}: expected an absolute http or https URL")
        if public:
            if split.scheme != "https":
                raise BadRequest(f"{name}: a public host calls https URLs only")
            try:
                await _public_addresses(split.hostname, port)
            except RefusedAddress as exc:
                raise BadRequest(
                    f"{name}: {exc}; a public host calls public addresses only"
                ) from None
            except OSError as exc:
                raise BadRequest(f"{name}: cannot resolve {split.hostname} ({exc})") from None
        checked[event] = url
    return checked


class CallbackSender:
    """The task that sends due callbacks; started and stopped with the service."""

    def __init__(self, store: Store, config: ServiceConfig, clock: Callable[[], float]) -> None:
        self.store = store
        self.config = config
        self.clock = clock
        self._wake = asyncio.Event()
        self._in_flight: dict[int, asyncio.Task[None]] = {}
        #: Sends that ended while the due list was being read: that list may predate them.
        self._settled: set[int] = set()
        self._task: asyncio.Task[None] | None = None
        self._http: SimpleAsyncHTTPClient | None = None
        self._stopping = False
        #: False once a round saw no callback waiting for its run: then a finished run makes
        #: none due and needs no round (most hosts have no callbacks, and runs finish often).
        self._awaiting_finish = True
        self._submissions = 0  # submissions with callbacks: a round's view predating one is stale

    def start(self) -> None:
        self._stopping = False
        resolver = PublicResolver() if self.config.public else None
        self._http = SimpleAsyncHTTPClient(
            force_instance=True, max_clients=MAX_IN_FLIGHT, resolver=resolver
        )
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop sending; a callback cut short stays in the store and is sent after a restart.

        The loop goes first, so it starts nothing new; the flag ends it even if its wait
        swallowed the cancellation (``wait_for`` does when the event fires at that moment)."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
            self._task = None
        sends = list(self._in_flight.values())
        for task in sends:
            task.cancel()
        if sends:
            await asyncio.wait(sends)
        self._in_flight.clear()
        if self._http is not None:
            self._http.close()
            self._http = None

    def wake(self) -> None:
        """Look for due callbacks now."""
        self._wake.set()

    def submitted(self) -> None:
        """Submissions with callbacks were stored: some may be due, others wait for a run."""
        self._awaiting_finish = True
        self._submissions += 1
        self.wake()

    def run_finished(self) -> None:
        """A run finished: its ``finished`` callbacks, if it has any, became due with it."""
        if self._awaiting_finish:
            self.wake()

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                timeout = await self._round()
            except Exception:  # the store is closing, or failed: the next round tries again
                log.exception("compute-queue: sending callbacks failed")
                timeout = 5.0
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _round(self) -> float:
        """Start sending what is due; how long to wait before looking again."""
        now = self.clock()
        self._settled.clear()
        submissions = self._submissions
        if not await self.store.callbacks_waiting() and submissions == self._submissions:
            self._awaiting_finish = False
        for callback in await self.store.due_callbacks(now, _BATCH):
            if self._stopping or len(self._in_flight) >= MAX_IN_FLIGHT:
                break
            if callback.id not in self._in_flight and callback.id not in self._settled:
                task = asyncio.create_task(self._send(callback))
                self._in_flight[callback.id] = task
        next_at = await self.store.next_callback_at()
        if next_at is None:
            return 60.0
        if next_at > now:
            return min(60.0, next_at - now)
        return 1.0  # what is due is being sent: a finished send wakes the loop

    async def _send(self, callback: DueCallback) -> None:
        try:
            failure = await self._post(callback)
            if failure is None:
                await self.store.callbacks_done([callback.id])
                return
            error, final = failure
            attempts = callback.attempts + 1
            if final or attempts >= self.config.callback_attempts:
                log.warning(
                    "compute-queue: gave up the %s callback to %s after %d attempt(s): %s",
                    callback.event,
                    _safe(callback.url),
                    attempts,
                    error,
                )
                await self.store.callbacks_done([callback.id])
                return
            delay = min(
                self.config.callback_backoff * 2 ** (attempts - 1),
                self.config.callback_backoff_max,
            )
            log.info(
                "compute-queue: %s callback to %s failed (%s); retrying in %.1f s",
                callback.event,
                _safe(callback.url),
                error,
                delay,
            )
            await self.store.callback_retry(callback.id, self.clock() + delay)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("compute-queue: callback %d", callback.id)
        finally:
            self._in_flight.pop(callback.id, None)
            self._settled.add(callback.id)
            self._wake.set()

    async def _post(self, callback: DueCallback) -> tuple[str, bool] | None:
        """POST one callback: None when the receiver took it, else what went wrong and
        whether that is final (a URL this host may not call) rather than worth a retry."""
        assert self._http is not None
        if self.config.public and urlsplit(callback.url).scheme != "https":
            return "a public host calls https URLs only", True
        request = HTTPRequest(
            callback.url,
            method="POST",
            body=json.dumps(callback.payload),
            headers={
                "Content-Type": "application/json",
                "User-Agent": f"jupyter-compute-queue/{__version__}",
                "X-Compute-Queue-Event": callback.event,
            },
            connect_timeout=self.config.callback_timeout,
            request_timeout=self.config.callback_timeout,
            follow_redirects=False,
        )
        try:
            response = await self._http.fetch(request, raise_error=False)
        except RefusedAddress as exc:
            return str(exc), True
        except Exception as exc:
            return (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__), False
        if 200 <= response.code < 300:
            return None
        return f"answered {response.code}", False


def _safe(url: str) -> str:
    """A URL without its query (it may carry a secret), for the log."""
    split = urlsplit(url)
    return f"{split.scheme}://{split.netloc.rpartition('@')[2]}{split.path}"
