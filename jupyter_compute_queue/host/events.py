"""The in-process event bus: the service publishes, websockets fan out.

Publishing never blocks and never waits for a subscriber. Each subscription has a bounded
buffer that coalesces: a newer event about the same run (or worker, or log) replaces the pending
one, so a slow reader gets the latest state rather than a backlog. If a buffer still overflows,
the subscriber gets one ``Overflow`` and should re-read the state it shows.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ..model.runs import RunRecord


@dataclass(frozen=True, slots=True)
class RunChanged:
    """A run's record changed (state, phase, holders, result)."""

    record: RunRecord

    @property
    def queue(self) -> str:
        return self.record.queue

    @property
    def coalesce_key(self) -> tuple[str, str]:
        return ("run", self.record.run_id)


@dataclass(frozen=True, slots=True)
class LogsAppended:
    """A run's log grew to ``end`` bytes; subscribers read from their own offset."""

    queue: str
    run_id: str
    end: int

    @property
    def coalesce_key(self) -> tuple[str, str]:
        return ("log", self.run_id)


@dataclass(frozen=True, slots=True)
class WorkerChanged:
    """A worker connected, changed its capacity or went away (``info`` None)."""

    queues: tuple[str, ...]
    worker_id: str
    info: dict[str, Any] | None

    @property
    def coalesce_key(self) -> tuple[str, str]:
        return ("worker", self.worker_id)


@dataclass(frozen=True, slots=True)
class Overflow:
    """This subscriber fell too far behind: some events were dropped."""


Event = RunChanged | LogsAppended | WorkerChanged


class Subscription:
    """A bounded, coalescing buffer of events for one subscriber."""

    def __init__(self, bus: EventBus, queue: str | None, maxsize: int) -> None:
        self._bus = bus
        self.queue = queue
        self._maxsize = maxsize
        self._pending: OrderedDict[tuple[str, str], Event] = OrderedDict()
        self._overflowed = False
        self._wakeup = asyncio.Event()
        self.closed = False

    def _offer(self, event: Event) -> None:
        if self.queue is not None and self.queue not in _queues(event):
            return
        key = event.coalesce_key
        if key not in self._pending and len(self._pending) >= self._maxsize:
            self._pending.clear()
            self._overflowed = True
        self._pending[key] = event
        self._wakeup.set()

    async def get(self) -> Event | Overflow:
        """The next event, waiting for one."""
        while not self._pending and not self._overflowed:
            if self.closed:
                raise asyncio.CancelledError("subscription closed")
            self._wakeup.clear()
            await self._wakeup.wait()
        if self._overflowed:
            self._overflowed = False
            return Overflow()
        return self._pending.popitem(last=False)[1]

    def close(self) -> None:
        """Stop receiving events."""
        self.closed = True
        self._bus._subscribers.discard(self)
        self._wakeup.set()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _queues(event: Event) -> tuple[str, ...]:
    return event.queues if isinstance(event, WorkerChanged) else (event.queue,)


class EventBus:
    """Fan-out of events to subscriptions, filtered by queue."""

    def __init__(self) -> None:
        self._subscribers: set[Subscription] = set()

    def subscribe(self, queue: str | None = None, maxsize: int = 1000) -> Subscription:
        """Events of one queue (or all, for None)."""
        sub = Subscription(self, queue, maxsize)
        self._subscribers.add(sub)
        return sub

    def publish(self, event: Event) -> None:
        """Hand an event to every interested subscriber, without waiting."""
        for sub in list(self._subscribers):
            sub._offer(event)
