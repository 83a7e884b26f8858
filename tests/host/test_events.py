"""The event bus: filtering by queue, coalescing, overflow, never blocking the publisher."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

from jupyter_compute_queue.host.events import (
    EventBus,
    LogsAppended,
    Overflow,
    RunChanged,
    WorkerChanged,
)
from jupyter_compute_queue.model.runs import RunRecord, RunState


def record(run_id: str, queue: str = "q", state: RunState = RunState.QUEUED) -> RunRecord:
    now = datetime.now(timezone.utc)
    return RunRecord(run_id=run_id, job_id="j", queue=queue, state=state, queued_at=now)


async def test_filters_by_queue() -> None:
    bus = EventBus()
    with bus.subscribe("q") as mine, bus.subscribe() as everything:
        bus.publish(RunChanged(record("1", "other")))
        bus.publish(RunChanged(record("2", "q")))
        bus.publish(WorkerChanged(("a", "q"), "w", None))
        got = [await mine.get(), await mine.get()]
        assert [type(e) for e in got] == [RunChanged, WorkerChanged]
        assert isinstance(got[0], RunChanged) and got[0].record.run_id == "2"
        assert len(everything._pending) == 3


async def test_coalesces_per_run_keeping_order_and_newest() -> None:
    bus = EventBus()
    with bus.subscribe("q") as sub:
        bus.publish(RunChanged(record("1")))
        bus.publish(RunChanged(record("2")))
        bus.publish(RunChanged(record("1", state=RunState.RUNNING)))
        bus.publish(LogsAppended("q", "1", 10))
        bus.publish(LogsAppended("q", "1", 20))
        first, second, third = [await sub.get() for _ in range(3)]
        assert isinstance(first, RunChanged) and first.record.state is RunState.RUNNING
        assert isinstance(second, RunChanged) and second.record.run_id == "2"
        assert isinstance(third, LogsAppended) and third.end == 20
        assert not sub._pending


async def test_overflow_is_reported_once_and_publisher_never_waits() -> None:
    bus = EventBus()
    with bus.subscribe("q", maxsize=10) as slow, bus.subscribe("q") as fast:
        for i in range(25):
            bus.publish(RunChanged(record(str(i))))
        assert isinstance(await slow.get(), Overflow)
        # After an overflow only what came since is kept.
        assert len(slow._pending) == 5
        assert len(fast._pending) == 25


async def test_get_waits_for_the_next_event_and_close_ends_it() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    waiter = asyncio.create_task(sub.get())
    await asyncio.sleep(0)
    assert not waiter.done()
    bus.publish(RunChanged(record("x")))
    event = await asyncio.wait_for(waiter, 5)
    assert isinstance(event, RunChanged)
    sub.close()
    bus.publish(RunChanged(record("y")))
    assert not sub._pending
