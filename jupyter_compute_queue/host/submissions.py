"""The queue service's submission side: an envelope and its definition checked (access,
namespace, size, the definition's fields, its blobs present, its secrets), handed to the store
in one transaction, then announced and pushed to workers; and copies of a stored job.

``QueueService`` inherits it, as it does the worker side (:mod:`.dispatch`); like that, it holds
no HTTP.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from ..model.canonical import canonical_json
from ..model.jobs import InvalidJob, JobDefinition, job_id, parse_definition
from ..model.runs import DEFAULT_NAMESPACE, RunRecord
from .access import AccessPolicy, Action, Identity, check_namespace
from .blobs import BlobStore
from .callbacks import CallbackSender, check_callbacks
from .logs import LogStore
from .metrics import QueueStats
from .secrets import SecretBox, check_values
from .service_base import DAY, BadRequest, ServiceConfig, TooLarge
from .store.base import Change, Store, SubmitRequest


class Submissions:
    """Submitting jobs and copying them to other queues (mixed into the service)."""

    store: Store
    blobs: BlobStore
    config: ServiceConfig
    policy: AccessPolicy
    clock: Callable[[], float]
    stats: QueueStats
    callbacks: CallbackSender
    secrets: SecretBox
    logs: LogStore
    # Defined by the service and its worker side: the access check, the announcement of
    # changed runs, pushing a queue's runs to its workers, reading a job, and whether a blob
    # is stored with the bytes its key names.
    check: Callable[[Identity, Action, str | None], None]
    _publish: Callable[[RunRecord], None]
    _apply: Callable[[Iterable[Change]], Awaitable[None]]
    dispatch: Callable[[str], Awaitable[None]]
    get_job: Callable[[Identity, str], Awaitable[dict[str, Any]]]
    has_blob: Callable[[str], Awaitable[bool]]

    async def submit(self, identity: Identity, queue: str, payload: Any) -> Any:
        """Submit one definition or envelope, or a list of them (answered by a list)."""
        self.check(identity, Action.SUBMIT, queue)
        items = payload if isinstance(payload, list) else [payload]
        if not items:
            raise BadRequest("an empty batch submits nothing")
        checked = [
            await self._request(queue, item, i if isinstance(payload, list) else None)
            for i, item in enumerate(items)
        ]
        requests = [request for request, _ in checked]
        results = await self.store.submit(requests, self.clock())
        # At once, before any await: a worker's claim of a new run is answered after this.
        for (_, values), result in zip(checked, results, strict=True):
            if result.outcome != "cached":
                self.secrets.keep(result.record.run_id, values)
            if result.outcome == "new":
                self.logs.fresh(result.record.run_id)
        for result in results:
            self.stats.submitted(queue, result.outcome)
            if result.outcome != "cached":
                self._publish(result.record)
            await self._apply(result.released)
        if any(r.callbacks for r in requests):
            self.callbacks.submitted()
        await self.dispatch(queue)
        answers = [self._answer(r.record) for r in results]
        return answers if isinstance(payload, list) else answers[0]

    async def _request(
        self, queue: str, item: Any, index: int | None
    ) -> tuple[SubmitRequest, dict[str, str]]:
        where = "" if index is None else f"[{index}]"
        if not isinstance(item, dict):
            raise BadRequest(f"submission{where}: expected a job definition or an envelope")
        envelope = item if "definition" in item else {"definition": item}
        unknown = set(envelope) - {"definition", "namespace", "rerun", "callbacks", "secrets"}
        if unknown:
            raise BadRequest(f"{where}{sorted(unknown)[0]}: unknown field of the envelope")
        callbacks = await check_callbacks(envelope.get("callbacks"), self.policy.public, where)
        namespace = envelope.get("namespace") or DEFAULT_NAMESPACE
        rerun = envelope.get("rerun", False)
        if not isinstance(rerun, bool):
            raise BadRequest(f"{where}rerun: must be true or false")
        try:
            check_namespace(str(namespace))
        except ValueError as exc:
            raise BadRequest(f"{where}namespace: {exc}") from None
        raw = envelope["definition"]
        if len(canonical_json(raw)) > self.config.max_definition_bytes:
            raise TooLarge(
                f"{where}definition: larger than {self.config.max_definition_bytes} bytes; "
                "upload big inputs as blobs and refer to them by key"
            )
        try:
            definition = parse_definition(raw)
        except InvalidJob as exc:
            raise BadRequest(f"{where}{exc}") from None
        await self._check_blobs(definition, where)
        try:
            secrets = check_values(envelope.get("secrets"), definition.secrets)
        except ValueError as exc:
            raise BadRequest(f"{where}{exc}") from None
        wire = definition.wire()
        stored = json.dumps(wire, ensure_ascii=False)  # before job_id, which changes wire
        request = SubmitRequest(
            queue=queue,
            definition=definition,
            job_id=job_id(definition, wire),
            stored=stored,
            namespace=str(namespace),
            rerun=rerun,
            cache_any_queue=self.config.cache_scope == "host" and not self.policy.public,
            cache_since=self.clock() - self.config.retention_days * DAY,
            callbacks=callbacks,
        )
        return request, secrets

    async def _check_blobs(self, definition: JobDefinition, where: str) -> None:
        for field_name, path, ref in definition.data_refs():
            key = ref.sha256() if ref.type.value == "key" else None
            if key is not None and not await self.has_blob(key):
                raise BadRequest(
                    f"{where}{field_name}.{path}: blob {key} is not on this host; upload it first"
                )

    def _answer(self, record: RunRecord) -> dict[str, Any]:
        return {
            "jobId": record.job_id,
            "runId": record.run_id,
            "queue": record.queue,
            "state": record.state.value,
            "cached": record.cached,
            "url": f"q/{record.queue}/j/{record.job_id}",
        }

    async def copy(self, identity: Identity, job: str, target: str, namespace: str | None) -> Any:
        """Submit a stored job's definition to another queue."""
        await self.get_job(identity, job)  # the caller must see the job in some queue
        definition = await self.store.get_definition(job)
        assert definition is not None
        envelope: dict[str, Any] = {"definition": definition}
        if namespace:
            envelope["namespace"] = namespace
        return await self.submit(identity, target, envelope)
