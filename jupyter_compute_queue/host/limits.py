"""Caps that keep a public host usable for everyone (docs/host.md, "Limits").

A public host takes work from strangers: the queue name is the only secret, and whoever has it
may submit jobs and upload blobs. Three caps bound what one queue or one client can take:

- **waiting runs** per queue: a queue holds at most ``max_queued_runs`` runs in ``Queued``;
- **submissions** per queue: at most ``max_submissions_per_minute``, as a token bucket, so a
  burst of that size passes and the budget refills evenly over the minute;
- **blob bytes** per client and for the whole host, per hour, also as token buckets. Blobs have
  no queue (``PUT f/{key}`` names none), so the client is the caller: its address, or its user
  name when the caller is a Jupyter user.

A cap reached is a :class:`TooManyRequests` (HTTP 429) whose message names the limit and its
value and says when to retry; the same number of seconds goes in ``Retry-After``. A request that
no wait could ever admit (a batch bigger than a cap) is :class:`TooLarge` (413) instead, since
retrying cannot help.

Who is capped (``scope``): ``"public"`` (the default) caps callers without Jupyter credentials
on a host in public mode, so a private host and the host's own users never meet a cap;
``"all"`` caps every caller but workers; ``"off"`` caps nobody. Workers are never capped: their
uploads are the outputs of runs the host gave them, and a refused upload would fail the run.

The state is in memory, per process: caps protect a running host, and a restart forgives.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..model.runs import RunState
from .access import Identity
from .service_base import ServiceError, TooLarge

if TYPE_CHECKING:
    from .metrics import QueueStats

__all__ = ["LimitConfig", "Limits", "TokenBucket", "TooManyRequests", "waiting_runs"]

GiB = 1024**3
#: A full queue frees up as workers take runs, which the host cannot foresee: this is how long
#: a refused submitter is told to wait before it tries again.
QUEUE_FULL_RETRY = 30.0
#: Buckets kept per kind before the full ones (clients that stopped) are forgotten.
_MAX_BUCKETS = 10_000


class TooManyRequests(ServiceError):
    """A cap was reached (429); ``retry_after`` is whole seconds, for the Retry-After header."""

    status = 429

    def __init__(self, message: str, retry_after: float) -> None:
        # Less a hair, so that float noise (20.000000001 s) does not round up a whole second.
        self.retry_after = max(1, math.ceil(retry_after - 1e-6))
        super().__init__(f"{message}; retry in {self.retry_after} s")


@dataclass
class LimitConfig:
    """The caps (0 turns one off) and who they apply to (see the module docstring)."""

    scope: str = "public"  # "public", "all" or "off"
    public: bool = False  # whether the host is in public mode
    max_queued_runs: int = 1000
    max_submissions_per_minute: int = 600
    max_blob_bytes_per_client_hour: int = 10 * GiB
    max_blob_bytes_per_host_hour: int = 50 * GiB


@dataclass
class TokenBucket:
    """``capacity`` tokens, refilled at ``capacity / window`` per second.

    Unlike a fixed window, the budget never resets all at once, and the time until ``n`` tokens
    are back is exact, which is what Retry-After needs.
    """

    capacity: float
    window: float
    level: float
    at: float

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.at)  # a clock that steps back refills nothing
        self.level = min(self.capacity, self.level + elapsed * self.capacity / self.window)
        self.at = max(self.at, now)

    def wait(self, n: float, now: float) -> float:
        """Seconds until ``n`` tokens are there (0: now)."""
        self._refill(now)
        return max(0.0, (n - self.level) * self.window / self.capacity)

    def take(self, n: float, now: float) -> None:
        self._refill(now)
        self.level -= n

    def give(self, n: float) -> None:
        self.level = min(self.capacity, self.level + n)

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.level >= self.capacity


@dataclass
class _Buckets:
    """Token buckets by key, created full. A public host may see any number of queue names or
    addresses, so past ``_MAX_BUCKETS`` the full ones are dropped (they hold nothing), and if
    still more than half remain, the oldest: memory stays bounded, at the price of forgiving
    some clients early (the per-host byte cap still holds them all)."""

    capacity: int
    window: float
    buckets: dict[str, TokenBucket] = field(default_factory=dict)

    def get(self, key: str, now: float) -> TokenBucket:
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) >= _MAX_BUCKETS:
                kept = [(k, b) for k, b in self.buckets.items() if not b.full(now)]
                self.buckets = dict(kept[-(_MAX_BUCKETS // 2) :])
            bucket = self.buckets[key] = TokenBucket(self.capacity, self.window, self.capacity, now)
        return bucket


def waiting_runs(stats: QueueStats, queue: str) -> int:
    """Runs in ``Queued`` in a queue, from the service's live counts rather than a store query
    on the submission path. It walks the host's unfinished runs: about 7 ms at 100 000; asked
    only for capped callers."""
    runs = list(stats.active.values())
    return sum(1 for run in runs if run.queue == queue and run.state is RunState.QUEUED)


class Limits:
    """The caps of one host. ``clock`` is monotonic seconds (tests move it by hand)."""

    def __init__(self, config: LimitConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._submissions = _Buckets(config.max_submissions_per_minute, 60.0)
        self._client_bytes = _Buckets(config.max_blob_bytes_per_client_hour, 3600.0)
        self._host_bytes = _Buckets(config.max_blob_bytes_per_host_hour, 3600.0)
        #: Submissions admitted but not yet answered, per queue: they are not among the
        #: waiting runs yet, and two batches at once must not both fill the last places.
        self._pending: dict[str, int] = {}

    def applies(self, identity: Identity) -> bool:
        """Whether this caller is capped."""
        if self.config.scope == "off" or identity.kind == "worker":
            return False
        if self.config.scope == "all":
            return True
        return self.config.public and identity.kind != "user"

    @contextmanager
    def submissions(
        self, identity: Identity, queue: str, count: int, waiting: Callable[[], int]
    ) -> Iterator[None]:
        """Admit ``count`` submissions to ``queue`` (a batch all or nothing), around the code
        that submits them. ``waiting`` counts the queue's waiting runs (asked only when the
        caller is capped). Every item counts as a new run: whether one joins a run or is a cached
        result is known only once it is submitted. A submission that fails gives its share of the
        per-minute budget back: only accepted submissions use it up."""
        if not self.applies(identity) or count <= 0:
            yield
            return
        cap = self.config.max_queued_runs
        if cap > 0:
            if count > cap:
                raise TooLarge(
                    f"batch: {count} submissions are more than queue {queue!r} may hold waiting "
                    f"(max_queued_runs = {cap}); send at most {cap} at a time"
                )
            now_waiting = waiting() + self._pending.get(queue, 0)
            if now_waiting + count > cap:
                raise TooManyRequests(
                    f"queue {queue!r} is full: {now_waiting} runs wait and {count} more would "
                    f"pass max_queued_runs = {cap}",
                    QUEUE_FULL_RETRY,
                )
        rate = self.config.max_submissions_per_minute
        bucket: TokenBucket | None = None
        if rate > 0:
            if count > rate:
                raise TooLarge(
                    f"batch: {count} submissions are more than queue {queue!r} takes in a "
                    f"minute (max_submissions_per_minute = {rate}); send at most {rate} at a time"
                )
            now = self.clock()
            bucket = self._submissions.get(queue, now)
            wait = bucket.wait(count, now)
            if wait > 0:
                raise TooManyRequests(
                    f"too many submissions to queue {queue!r}: max_submissions_per_minute = {rate}",
                    wait,
                )
            bucket.take(count, now)
        self._pending[queue] = self._pending.get(queue, 0) + count
        try:
            yield
        except BaseException:
            if bucket is not None:
                bucket.give(count)
            raise
        finally:
            left = self._pending[queue] - count
            if left:
                self._pending[queue] = left
            else:
                del self._pending[queue]

    def blob_bytes(self, identity: Identity, client: str, size: int) -> None:
        """Charge an upload of ``size`` bytes to the caller (``client``: its address) and to
        the host, or refuse it. Bytes count whether or not the blob is kept in the end (a
        mismatching hash still took the bandwidth and the disk while it was written)."""
        if not self.applies(identity) or size <= 0:
            return
        who = f"user {identity.name!r}" if identity.kind == "user" else client
        caps = [
            (buckets, key, name, whose)
            for buckets, key, name, whose in (
                (self._client_bytes, who, "max_blob_bytes_per_client_hour", f"from {who}"),
                (self._host_bytes, "*", "max_blob_bytes_per_host_hour", "to this host"),
            )
            if buckets.capacity > 0
        ]
        for buckets, _, name, whose in caps:
            if size > buckets.capacity:
                raise TooLarge(
                    f"blob: {size} bytes are more than may be uploaded {whose} in an hour "
                    f"({name} = {buckets.capacity})"
                )
        now = self.clock()
        found = [
            (buckets.get(key, now), name, whose, buckets.capacity)
            for buckets, key, name, whose in caps
        ]
        for bucket, name, whose, capacity in found:
            wait = bucket.wait(size, now)
            if wait > 0:
                raise TooManyRequests(
                    f"too many blob bytes uploaded {whose}: {name} = {capacity}", wait
                )
        for bucket, *_ in found:
            bucket.take(size, now)
