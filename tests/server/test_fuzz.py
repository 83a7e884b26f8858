"""Generated requests against the real server: schemathesis reads docs/openapi.yaml and makes
cases for every operation, inside the schema (positive) and outside it (negative), with and
without credentials, on a public host. No case may get a 5xx or hang, and every error is the
API's JSON ``{"error": message}``.

Schemathesis's Python API drives hypothesis in a thread while the server runs on the test's
event loop and answers on a real port under a non-root base URL. Path parameters are drawn at
random and also from a job that ran (a queue, a job id, a blob key, an input and output path),
so the cases reach past "not found". The quick test is deterministic (``derandomize``); the
``slow`` one draws new cases each run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from jupyter_compute_queue.host.service import QueueService
from jupyter_compute_queue.host.store.base import Outcome, WorkerInfo
from jupyter_compute_queue.model.capacity import Capacity
from jupyter_compute_queue.model.runs import OutputRef, Reason

from ..conftest import USER, ScriptedWorker
from .conftest import Fetch, body
from .scripted import WsFetch, watch

DOC = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
#: Seconds one call may take before the case counts as a hang.
CALL_TIMEOUT = 10.0


@dataclass
class Tally:
    """What the fuzzing did: cases by status, the slowest call, and what went wrong."""

    statuses: Counter[int] = field(default_factory=Counter)
    slowest: float = 0.0
    cases: int = 0

    def line(self) -> str:
        codes = ", ".join(f"{code}: {n}" for code, n in sorted(self.statuses.items()))
        return f"{self.cases} cases ({codes}); slowest call {self.slowest:.2f} s"


def no_dns(payload: Any) -> Any:
    """Callback URLs with their host replaced by 127.0.0.1. A public host resolves a callback's
    host when it is submitted, and where DNS does not answer (a sandbox, some CI) each lookup
    waits seconds: the cases should test the host, not the resolver. The URL's shape (scheme,
    port, path), which is what the host validates first, stays."""
    if isinstance(payload, list):
        return [no_dns(item) for item in payload]
    if not isinstance(payload, dict):
        return payload
    out = dict(payload)
    callbacks = out.get("callbacks")
    if isinstance(callbacks, dict):
        out["callbacks"] = {k: _local(v) for k, v in callbacks.items()}
    if isinstance(out.get("definition"), dict):
        out["definition"] = no_dns(out["definition"])
    return out


def _local(url: Any) -> Any:
    if not isinstance(url, str):
        return url
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError:
        return url
    if not host:
        return url
    netloc = "127.0.0.1" + (f":{port}" if port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def check_answer(case: Any, response: Any, elapsed: float, tally: Tally) -> None:
    """No 5xx; a 4xx carries the API's JSON error (HEAD has no body)."""
    tally.cases += 1
    tally.statuses[response.status_code] += 1
    tally.slowest = max(tally.slowest, elapsed)
    where = case.as_curl_command()
    assert response.status_code < 500, f"{response.status_code} {response.text[:500]}\n{where}"
    if 400 <= response.status_code < 500 and case.method != "HEAD":
        declared = response.headers.get("content-type") or [""]  # schemathesis: name → values
        assert declared[0].startswith("application/json"), where
        error = response.json().get("error")
        assert isinstance(error, str) and error, where


def fuzz(base_url: str, token: str, known: dict[str, str], examples: int, fixed: bool) -> Tally:
    """Every operation of the document, positive and negative cases; runs in a thread."""
    schema = schemathesis.openapi.from_path(DOC)
    tally = Tally()
    sessions = {True: requests.Session(), False: requests.Session()}
    credentials = {"Authorization": f"token {token}"}
    for result in schema.get_all_operations():
        operation = result.ok()
        ours = {p.name: known[p.name] for p in operation.path_parameters}
        modes = {
            # Random path parameters, and those of the job that ran (the rest is generated).
            GenerationMode.POSITIVE: st.one_of(
                operation.as_strategy(GenerationMode.POSITIVE),
                operation.as_strategy(GenerationMode.POSITIVE, path_parameters=ours),
            ),
            # Outside the schema in the query, headers and body. Path parameters stay valid: a
            # path parameter breaking '^[^/]+$' would need a '/', which is another route.
            GenerationMode.NEGATIVE: operation.as_strategy(
                GenerationMode.NEGATIVE, path_parameters=ours
            ),
        }
        for strategy in modes.values():

            @given(case=strategy, anonymous=st.booleans())
            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                derandomize=fixed,
                suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.generate, Phase.shrink],
            )
            def one(case: Any, anonymous: bool) -> None:
                if case.body is not None and not isinstance(case.body, (str, bytes)):
                    case.body = no_dns(case.body)
                session = sessions[anonymous]
                session.cookies.clear()  # a cookie would make the caller XSRF-checked
                started = time.monotonic()
                response = case.call(
                    base_url=base_url,
                    session=session,
                    headers={} if anonymous else credentials,
                    timeout=CALL_TIMEOUT,
                )
                check_answer(case, response, time.monotonic() - started, tally)

            # Unsatisfiable: nothing of the operation can be outside the schema (no query, body).
            with contextlib.suppress(Unsatisfiable):
                one()
    return tally


async def ran_job(service: QueueService, fetch: Fetch) -> dict[str, str]:
    """A job that ran in queue ``demo`` with an input and an output ``data/x.csv``, a blob
    input and a log: the values path parameters are drawn from."""
    data = b"a,b\n1,2\n"
    key = hashlib.sha256(data).hexdigest()
    assert (await fetch("f", key, method="PUT", body=data)).code == 201
    definition = {
        "image": "busybox",
        "command": "cat /inputs/data/x.csv",
        "inputs": {
            "data/x.csv": {"type": "key", "value": key},
            "n.txt": {"type": "utf8", "value": "1"},
        },
    }
    job_id = body(await fetch("q", "demo", method="POST", json=definition))["jobId"]
    worker = ScriptedWorker(WorkerInfo("fuzz-worker", ("demo",), Capacity(1)))
    await service.connect_worker(USER, worker.info, [], worker.deliver, worker.stop)
    await service.report_free("fuzz-worker", worker.info.capacity)
    [assignment] = worker.assigned
    run_id = assignment.record.run_id
    service.append_logs("fuzz-worker", run_id, assignment.fence, [("out", "a,b\n1,2\n", None)])
    outputs = {"data/x.csv": OutputRef(key=key, size=len(data))}
    await service.finish(
        "fuzz-worker", run_id, assignment.fence, Outcome(Reason.SUCCESS, 0, outputs=outputs)
    )
    await service.disconnect_worker("fuzz-worker", graceful=True)
    return {"queue": "demo", "job": job_id, "key": key, "path": "data/x.csv", "asset": "page.js"}


async def run_fuzz(
    jp_serverapp: Any,
    fetch: Fetch,
    jp_ws_fetch: WsFetch,
    port: int,
    base: str,
    examples: int,
    fixed: bool,
) -> Tally:
    app = jp_serverapp.web_app.settings["compute_queue"]
    known = await ran_job(await app.ready(), fetch)
    token = jp_serverapp.identity_provider.token
    url = f"http://127.0.0.1:{port}{base}compute-queue"
    tally = await asyncio.to_thread(fuzz, url, token, known, examples, fixed)
    print(tally.line())
    assert tally.slowest < CALL_TIMEOUT
    # The host is unaffected: the job that ran is intact, and it takes and shows new work.
    record = body(await fetch("q", "demo", "j", known["job"], "result.json"))
    assert record["reason"] == "Success" and set(record["outputs"]) == {"data/x.csv"}
    client = await watch(jp_ws_fetch, "after-fuzz")
    answer = body(await fetch("q", "after-fuzz", method="POST", json={"image": "x"}))
    assert (await client.expect("run"))["run"]["runId"] == answer["runId"]
    return tally


PUBLIC_HOST = {"public": True, "callback_attempts": 1}


@pytest.mark.parametrize("cq_config", [PUBLIC_HOST])
async def test_generated_requests_get_no_5xx(
    jp_serverapp: Any, fetch: Fetch, jp_ws_fetch: WsFetch, jp_http_port: int, jp_base_url: str
) -> None:
    tally = await run_fuzz(
        jp_serverapp, fetch, jp_ws_fetch, jp_http_port, jp_base_url, examples=40, fixed=True
    )
    assert tally.cases >= 1500, tally.line()
    # Both sides of the API were reached: successes, refusals, and the job that ran.
    assert tally.statuses[200] >= 100 and tally.statuses[400] >= 100, tally.line()
    assert tally.statuses[401] and tally.statuses[404], tally.line()


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("cq_config", [PUBLIC_HOST])
async def test_many_more_generated_requests_get_no_5xx(
    jp_serverapp: Any, fetch: Fetch, jp_ws_fetch: WsFetch, jp_http_port: int, jp_base_url: str
) -> None:
    tally = await run_fuzz(
        jp_serverapp, fetch, jp_ws_fetch, jp_http_port, jp_base_url, examples=150, fixed=False
    )
    assert tally.cases >= 5000, tally.line()


def test_callback_hosts_are_replaced_not_resolved() -> None:
    payload = [
        {"definition": {"image": "x"}, "callbacks": {"queued": "https://example.org:8443/a?b"}},
        {"callbacks": {"finished": "not a url", "queued": 5}},
        {"image": "x"},
    ]
    assert no_dns(payload) == [
        {"definition": {"image": "x"}, "callbacks": {"queued": "https://127.0.0.1:8443/a?b"}},
        {"callbacks": {"finished": "not a url", "queued": 5}},
        {"image": "x"},
    ]
    assert json.dumps(no_dns("text")) == '"text"'
