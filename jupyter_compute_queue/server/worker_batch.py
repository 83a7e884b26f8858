"""The worker socket's ``batch`` message: several protocol messages in one frame
(docs/protocol.md, "Batches").

Its messages are handled in order, each as if it had come in a frame of its own, with one
difference that nobody can see but the disk: consecutive results are handed to the store
together, so they share one commit instead of waiting for one each. Their answers still go out
after that commit and in the order of the messages; a message that must see them committed (a
capacity report claims runs, a give-back or heartbeat reads what the worker holds) waits for
them first, and so does an answer that would overtake theirs.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from ..host.service import QueueService, ServiceError
from ..host.store.base import Conflict, NotFound, Outcome
from ..model.runs import RunRecord

#: Messages that never wait for a commit and are answered only when refused.
_AT_ONCE = {"phase", "logs"}


class ProtocolError(ValueError):
    """A message that does not follow the protocol; its text goes back to the peer."""


class WorkerSocket(Protocol):
    """What a batch needs of the worker socket (:class:`.websockets.WorkerSocket` is it): a
    protocol, so that the socket can import this module and not the other way round."""

    worker_id: str | None
    service: QueueService

    def result_of(self, msg: dict[str, Any]) -> tuple[str, int, Outcome]: ...

    async def handle(self, msg: dict[str, Any]) -> dict[str, Any] | None: ...

    async def send(self, message: dict[str, Any]) -> None: ...

    async def send_all(self, messages: list[dict[str, Any]]) -> None: ...


def refusal(exc: Exception, msg: dict[str, Any]) -> dict[str, Any] | None:
    """The answer to a message whose handling raised ``exc``; None for an unexpected error."""
    if isinstance(exc, Conflict):
        return {
            "type": "conflict",
            "runId": msg.get("runId"),
            "fence": msg.get("fence"),
            "error": str(exc),
        }
    if isinstance(exc, (ProtocolError, ServiceError, NotFound, ValueError)):
        ref = msg.get("type")
        return {"type": "error", "error": str(exc), **({"ref": ref} if ref else {})}
    return None


def accepted(run_id: str, fence: int, record: RunRecord) -> dict[str, Any]:
    return {"type": "accepted", "runId": run_id, "fence": fence, "run": record.wire()}


async def handle_batch(socket: WorkerSocket, messages: list[Any]) -> None:
    """Handle a batch's messages in order (see the module's docstring)."""
    assert socket.worker_id is not None
    waiting: list[tuple[dict[str, Any], asyncio.Future[RunRecord]]] = []
    for msg in messages:
        answer: dict[str, Any] | None
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            error = ProtocolError('batch: every message is an object with a "type"')
            answer = refusal(error, {"type": "batch"})
        elif msg["type"] == "batch":
            answer = refusal(ProtocolError("batch: a batch holds no batches"), msg)
        elif msg["type"] == "result" and not msg.get("outputs"):
            # Outputs are checked against the blob store first, so those go one at a time.
            try:
                run_id, fence, outcome = socket.result_of(msg)
            except ProtocolError as exc:
                answer = refusal(exc, msg)
            else:
                finish = socket.service.finish(socket.worker_id, run_id, fence, outcome)
                waiting.append((msg, asyncio.ensure_future(finish)))
                continue
        else:
            if msg["type"] not in _AT_ONCE or any(
                msg.get("runId") == w.get("runId") for w, _ in waiting
            ):
                await answer_results(socket, waiting)
            answer = await socket.handle(msg)
        if answer is not None:
            await answer_results(socket, waiting)
            await socket.send(answer)
    await answer_results(socket, waiting)


async def answer_results(
    socket: WorkerSocket, waiting: list[tuple[dict[str, Any], asyncio.Future[RunRecord]]]
) -> None:
    """Answer the results handed to the store, in order, once committed; empties ``waiting``."""
    answers = []
    try:
        for msg, finished in waiting:
            try:
                record = await finished
            except Exception as exc:
                answer = refusal(exc, msg)
                if answer is None:
                    raise
            else:
                answer = accepted(msg["runId"], msg["fence"], record)
            answers.append(answer)
    finally:
        waiting.clear()
    if answers:  # together: a worker that takes batches gets them in one frame
        await socket.send_all(answers)
