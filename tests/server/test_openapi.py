"""docs/openapi.yaml and the server agree (SPEC §7): every route, verb and path parameter.

The server's side comes from ``handlers.ROUTES`` (each route as an OpenAPI path template with
its handler class) and ``handlers.PARAMETERS``; the verbs of a route are those its handler class
defines, up to ``BaseHandler``. A parameter whose regex is a plain alternation of literals
(``{part}``, ``{kind}``) is written out in the document as one path per value; the document may
also keep such a parameter with an ``enum``: both sides are expanded before they are compared.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate as validate_spec
from pydantic import BaseModel
from tornado import web
from tornado.websocket import WebSocketHandler

from jupyter_compute_queue.host.service import QueueService
from jupyter_compute_queue.model.job_fields import BuildSpec, DataRef, Requirements
from jupyter_compute_queue.model.jobs import JobDefinition
from jupyter_compute_queue.model.jobs import parse_definition as parse_job
from jupyter_compute_queue.model.runs import (
    OutputRef,
    Phase,
    Reason,
    RunRecord,
    RunState,
    WorkerRef,
)
from jupyter_compute_queue.server import files, handlers
from jupyter_compute_queue.server.base import BaseHandler
from jupyter_compute_queue.server.queue_routes import StatusHandler

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "openapi.yaml"
PROTOCOL = ROOT / "docs" / "protocol.md"
#: Every verb tornado dispatches, lowercase (the OpenAPI operation keys).
VERBS = tuple(m.lower() for m in web.RequestHandler.SUPPORTED_METHODS)
#: The websockets of SPEC §7: not HTTP routes, listed under ``x-websockets``.
WEBSOCKETS = {"/q/{queue}/ws", "/worker"}
#: Values for the path parameters when a path is turned into a URL.
SAMPLES = {
    "key": "ab" * 32,
    "queue": "demo",
    "job": "cd" * 32,
    "path": "data/x.csv",
    "asset": "page.js",
}
TEMPLATE_PARAMETER = re.compile(r"\{(\w+)\}")
ERROR = "#/components/schemas/Error"

Route = tuple[str, str]  # (path template under compute-queue/ with a leading "/", verb)


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    with DOC.open(encoding="utf-8") as handle:
        loaded = yaml.safe_load(handle)
    assert isinstance(loaded, dict), "docs/openapi.yaml is not a YAML mapping"
    return loaded


# --- the server's side ------------------------------------------------------------------------


def handler_verbs(handler: type) -> set[str]:
    """The verbs a handler class serves: those it or its own bases define, up to BaseHandler
    (tornado's RequestHandler has a stub for every verb, answering 405: those do not count)."""
    verbs: set[str] = set()
    for klass in handler.__mro__:
        if klass in (BaseHandler, web.RequestHandler):
            break
        verbs.update(verb for verb in VERBS if verb in vars(klass))
    return verbs


_LITERAL = re.compile(r"(?:[\w-]|\\[^\w\s])+")


def literal_values(regex: str) -> list[str] | None:
    r"""The values of a parameter whose regex is an alternation of literals (``a\.json|b``),
    else None (``[^/]+`` and the like stay parameters)."""
    alternatives = regex.split("|")
    if not all(_LITERAL.fullmatch(a) for a in alternatives):
        return None
    values = [re.sub(r"\\(.)", r"\1", a) for a in alternatives]
    assert all(re.fullmatch(regex, v) for v in values), regex
    return values


def expand(template: str, values_of: Callable[[str], Sequence[str] | None]) -> list[str]:
    """The paths a template stands for: parameters with known values written out."""
    paths = [template]
    for name in TEMPLATE_PARAMETER.findall(template):
        values = values_of(name)
        if values is not None:
            paths = [p.replace(f"{{{name}}}", v, 1) for p in paths for v in values]
    return paths


def served_routes(
    routes: Sequence[tuple[str, type]], parameters: dict[str, str]
) -> tuple[set[Route], set[str]]:
    """(path, verb) of every HTTP route, and the paths of the websocket routes."""
    http: set[Route] = set()
    websockets: set[str] = set()
    for template, handler in routes:
        path = "/" + template
        if issubclass(handler, WebSocketHandler):
            websockets.add(path)
            continue
        verbs = handler_verbs(handler)
        for concrete in expand(path, lambda name: literal_values(parameters[name])):
            http.update((concrete, verb) for verb in verbs)
    return http, websockets


# --- the document's side ----------------------------------------------------------------------


def pointer(doc: Any, ref: str) -> Any:
    """The node a local ``$ref`` points at; KeyError (or IndexError) when it does not resolve."""
    if not ref.startswith("#/"):
        raise KeyError(f"{ref}: only references inside the document are expected")
    node = doc
    for token in ref[2:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        node = node[int(token)] if isinstance(node, list) else node[token]
    return node


def resolve(doc: Any, node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        node = pointer(doc, node["$ref"])
    return node


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(path, verb, operation, its path parameters by name) for every operation."""
    for path, item in doc["paths"].items():
        for verb in VERBS:
            if verb not in item:
                continue
            operation = item[verb]
            params = {}
            for raw in [*item.get("parameters", []), *operation.get("parameters", [])]:
                param = resolve(doc, raw)
                if param.get("in") == "path":
                    params[param["name"]] = param
            yield path, verb, operation, params


def documented_routes(doc: dict[str, Any]) -> set[Route]:
    """(path, verb) of every operation, path parameters with an ``enum`` written out."""
    routes: set[Route] = set()
    for path, verb, _, params in operations(doc):

        def enum(name: str, params: dict[str, Any] = params) -> list[str] | None:
            schema = resolve(doc, params.get(name, {}).get("schema", {}))
            return schema.get("enum") if isinstance(schema, dict) else None

        routes.update((concrete, verb) for concrete in expand(path, enum))
    return routes


def mismatches(served: set[Route], documented: set[Route]) -> list[str]:
    """What one side has and the other lacks, one line each."""
    return [
        f"served but not in docs/openapi.yaml: {verb.upper()} {path}"
        for path, verb in sorted(served - documented)
    ] + [
        f"in docs/openapi.yaml but not served: {verb.upper()} {path}"
        for path, verb in sorted(documented - served)
    ]


def unanchored(pattern: str) -> str | None:
    """``X`` of ``^X$`` or ``^(?:X)$``; None for a pattern that is not anchored at both ends."""
    match = re.fullmatch(r"\^(?:\(\?:(.*)\)|(.*))\$", pattern, re.S)
    if match is None:
        return None
    return match.group(1) if match.group(1) is not None else match.group(2)


def parameter_problems(doc: dict[str, Any], parameters: dict[str, str]) -> list[str]:
    """Path parameters that are missing, unknown to the server, or not its pattern or values."""
    problems = []
    for path, verb, _, params in operations(doc):
        where = f"{verb.upper()} {path}"
        named = TEMPLATE_PARAMETER.findall(path)
        for name in sorted(set(named) - set(params)):
            problems.append(f"{where}: {{{name}}} is not declared as a path parameter")
        for name, param in sorted(params.items()):
            if name not in named:
                problems.append(f"{where}: path parameter {name!r} is not in the template")
                continue
            if param.get("required") is not True:
                problems.append(f"{where}: {{{name}}} must be required")
            regex = parameters.get(name)
            if regex is None:
                problems.append(f"{where}: {{{name}}} is not a parameter of the server")
                continue
            schema = resolve(doc, param.get("schema", {}))
            if "enum" in schema:
                values = literal_values(regex)
                unmatched = [v for v in schema["enum"] if not re.fullmatch(regex, str(v))]
                if unmatched or (values is not None and set(schema["enum"]) != set(values)):
                    problems.append(f"{where}: {{{name}}} enum {schema['enum']} is not {regex!r}")
            elif "pattern" in schema:
                if unanchored(schema["pattern"]) != regex:
                    problems.append(
                        f"{where}: {{{name}}} pattern {schema['pattern']!r} is not the server's "
                        f"{regex!r} anchored as '^…$'"
                    )
            else:
                problems.append(
                    f"{where}: {{{name}}} has neither the pattern nor the enum {regex!r}"
                )
    return problems


def references(node: Any, where: str = "#") -> Iterator[tuple[str, str]]:
    """(location, target) of every ``$ref`` in the document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield where, value
            else:
                token = str(key).replace("~", "~0").replace("/", "~1")
                yield from references(value, f"{where}/{token}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from references(value, f"{where}/{i}")


# --- the server and the document agree --------------------------------------------------------


def test_every_route_is_documented_and_every_documented_route_is_served(
    doc: dict[str, Any],
) -> None:
    served, _ = served_routes(handlers.ROUTES, handlers.PARAMETERS)
    assert served, "no routes found in handlers.ROUTES"
    problems = mismatches(served, documented_routes(doc))
    assert not problems, "docs/openapi.yaml and handlers.ROUTES disagree:\n" + "\n".join(problems)


def test_path_parameters_have_the_servers_pattern_or_values(doc: dict[str, Any]) -> None:
    problems = parameter_problems(doc, handlers.PARAMETERS)
    assert not problems, "path parameters disagree with handlers.PARAMETERS:\n" + "\n".join(
        problems
    )


def test_each_documented_path_reaches_its_handler(doc: dict[str, Any]) -> None:
    """Through the server's real URL patterns, first match wins as in tornado: an order of
    ROUTES that lets one route shadow another fails here."""
    patterns = [(re.compile(pattern), handler) for pattern, handler in handlers.routes()]
    problems = []
    for path, verb in sorted(documented_routes(doc)):
        url = handlers.API + TEMPLATE_PARAMETER.sub(lambda m: SAMPLES[m.group(1)], path)
        handler = next(h for p, h in patterns if p.fullmatch(url))
        if verb not in handler_verbs(handler):
            problems.append(f"{verb.upper()} {url} reaches {handler.__name__}")
    assert not problems, "\n".join(problems)


def test_websockets_are_listed_as_exceptions(doc: dict[str, Any]) -> None:
    listed = [entry["path"] for entry in doc.get("x-websockets", [])]
    assert set(listed) == WEBSOCKETS, f"x-websockets should list {sorted(WEBSOCKETS)}"
    assert not set(listed) & set(doc["paths"]), "a websocket is documented as an HTTP route"
    served, websockets = served_routes(handlers.ROUTES, handlers.PARAMETERS)
    assert not set(listed) & {path for path, _ in served}, "a websocket is served as HTTP"
    assert websockets <= set(listed), f"websocket routes missing: {websockets - set(listed)}"


# --- the comparison can fail ------------------------------------------------------------------


class _StatsHandler(BaseHandler):
    def get(self, queue: str) -> None:
        """A route the document does not have."""


class _NoVerbs(BaseHandler):
    """Inherits tornado's stubs for every verb, and defines none of its own."""


class _DeletableStatus(StatusHandler):
    def delete(self, queue: str) -> None:
        """A verb added to a documented route."""


def test_an_undocumented_route_is_reported(doc: dict[str, Any]) -> None:
    fake: list[tuple[str, type]] = [*handlers.ROUTES, ("q/{queue}/stats", _StatsHandler)]
    served, _ = served_routes(fake, handlers.PARAMETERS)
    assert mismatches(served, documented_routes(doc)) == [
        "served but not in docs/openapi.yaml: GET /q/{queue}/stats"
    ]


def test_an_undocumented_verb_and_a_route_no_longer_served_are_reported(
    doc: dict[str, Any],
) -> None:
    fake: list[tuple[str, type]] = [
        (template, _DeletableStatus if handler is StatusHandler else handler)
        for template, handler in handlers.ROUTES
        if template != "j/{job}/copy"
    ]
    served, _ = served_routes(fake, handlers.PARAMETERS)
    assert mismatches(served, documented_routes(doc)) == [
        "served but not in docs/openapi.yaml: DELETE /q/{queue}/status",
        "in docs/openapi.yaml but not served: POST /j/{job}/copy",
    ]


def test_a_wrong_parameter_pattern_or_enum_is_reported(doc: dict[str, Any]) -> None:
    wrong = copy.deepcopy(doc)
    wrong["components"]["parameters"]["Queue"]["schema"]["pattern"] = "[^/]+"  # not anchored
    problems = parameter_problems(wrong, handlers.PARAMETERS)
    assert problems and all("{queue}" in p for p in problems)
    # A {part} parameter kept in the document: its enum must be the server's values.
    item = wrong["paths"].pop("/j/{job}/logs")
    for name in ("definition.json", "result.json", "namespaces.json"):
        del wrong["paths"][f"/j/{{job}}/{name}"]
    part: dict[str, Any] = {"name": "part", "in": "path", "required": True, "schema": {}}
    part["schema"]["enum"] = ["logs"]
    item["parameters"] = [*item["parameters"], part]
    wrong["paths"]["/j/{job}/{part}"] = item
    assert any("{part} enum" in p for p in parameter_problems(wrong, handlers.PARAMETERS))
    served, _ = served_routes(handlers.ROUTES, handlers.PARAMETERS)
    assert mismatches(served, documented_routes(wrong)) == [
        f"served but not in docs/openapi.yaml: GET /j/{{job}}/{p}"
        for p in ("definition.json", "namespaces.json", "result.json")
    ]
    part["schema"]["enum"] = ["definition.json", "result.json", "namespaces.json", "logs"]
    assert not mismatches(served, documented_routes(wrong))


def test_handler_verbs_ignore_tornados_stubs() -> None:
    assert handler_verbs(_NoVerbs) == set()
    assert handler_verbs(handlers.QueueJobHandler) == {"get", "delete"}  # get is inherited
    assert handler_verbs(handlers.BlobHandler) == {"get", "head", "put"}
    assert literal_values(handlers.PARAMETERS["kind"]) == ["inputs", "outputs"]
    assert literal_values(handlers.PARAMETERS["queue"]) is None


# --- the document itself ----------------------------------------------------------------------


def test_the_document_is_valid_openapi_3_1(doc: dict[str, Any]) -> None:
    assert str(doc["openapi"]).startswith("3.1")
    validate_spec(doc)


def test_every_reference_resolves(doc: dict[str, Any]) -> None:
    refs = list(references(doc))
    assert refs
    broken = []
    for where, target in refs:
        try:
            pointer(doc, target)
        except (KeyError, IndexError, ValueError, TypeError):
            broken.append(f"{where}: {target}")
    assert not broken, "unresolved $ref:\n" + "\n".join(broken)


def test_operations_are_complete(doc: dict[str, Any]) -> None:
    assert doc["servers"][0]["url"] == "{base_url}compute-queue"
    ids = []
    problems = []
    for path, verb, operation, _ in operations(doc):
        where = f"{verb.upper()} {path}"
        ids.append(operation.get("operationId"))
        if not operation.get("operationId") or not operation.get("summary"):
            problems.append(f"{where}: needs an operationId and a summary")
        responses = operation.get("responses", {})
        if not any(str(code)[0] in "23" for code in responses):
            problems.append(f"{where}: no success response")
        if operation.get("security") != [] and "401" not in responses:
            problems.append(f"{where}: needs credentials but documents no 401")
        for code, response in responses.items():
            if str(code)[0] not in "45":
                continue
            schema = resolve(doc, response).get("content", {}).get("application/json", {})
            if schema.get("schema", {}).get("$ref") != ERROR:
                problems.append(f"{where}: error {code} is not an Error")
    assert len(ids) == len(set(ids)), "operationIds repeat"
    assert not problems, "\n".join(problems)


def test_file_responses_are_safe_attachments(doc: dict[str, Any]) -> None:
    """Blobs, inputs, outputs and zips are attachments with nosniff and a sandbox CSP; logs
    carry nosniff and the CSP."""
    file_handlers = (handlers.BlobHandler, handlers.JobFileHandler, handlers.OutputsZipHandler)
    checked = 0
    for template, handler in handlers.ROUTES:
        if not issubclass(handler, (*file_handlers, handlers.JobPartHandler)):
            continue
        values = lambda name: literal_values(handlers.PARAMETERS[name])  # noqa: E731
        for path in expand("/" + template, values):
            attachment = issubclass(handler, file_handlers)
            if not attachment and not path.endswith("/logs"):
                continue
            for verb in handler_verbs(handler) & {"get", "head"}:
                response = resolve(doc, doc["paths"][path][verb]["responses"]["200"])
                headers = {
                    name.lower(): resolve(doc, header).get("schema", {})
                    for name, header in response.get("headers", {}).items()
                }
                where = f"{verb.upper()} {path}"
                assert headers.get("x-content-type-options", {}).get("const") == "nosniff", where
                csp = headers.get("content-security-policy", {}).get("const")
                assert csp == files.SANDBOX_CSP, where
                if attachment:
                    assert "attachment" in headers.get("content-disposition", {}).get(
                        "pattern", ""
                    ), where
                checked += 1
    assert checked >= 10


# --- the schemas describe what the code sends and accepts --------------------------------------


def schema_validator(doc: dict[str, Any], name: str) -> Any:
    """A JSON Schema validator of ``components/schemas/<name>`` (references into the doc)."""
    return OAS31Validator({"components": doc["components"], "$ref": f"#/components/schemas/{name}"})


def _fields(model: type[BaseModel]) -> set[str]:
    return {field.alias or name for name, field in model.model_fields.items()}


@pytest.mark.parametrize(
    ("schema", "model"),
    [
        ("JobDefinition", JobDefinition),
        ("BuildSpec", BuildSpec),
        ("Requirements", Requirements),
        ("DataRef", DataRef),
        ("RunRecord", RunRecord),
        ("WorkerRef", WorkerRef),
        ("OutputRef", OutputRef),
    ],
)
def test_schema_fields_are_the_models(
    doc: dict[str, Any], schema: str, model: type[BaseModel]
) -> None:
    assert set(doc["components"]["schemas"][schema]["properties"]) == _fields(model)


def _protocol_definitions() -> list[Any]:
    """The definitions of the test vectors in docs/protocol.md."""
    row = re.compile(r"^\| \d+ \| [^|]* \| `(\{.*\})` \| `[0-9a-f]{64}` \|$", re.M)
    return [json.loads(m.group(1)) for m in row.finditer(PROTOCOL.read_text(encoding="utf-8"))]


def test_definitions_the_host_accepts_fit_the_schema(doc: dict[str, Any]) -> None:
    definitions = _protocol_definitions()
    assert len(definitions) >= 20
    validator = schema_validator(doc, "JobDefinition")
    for definition in definitions:
        assert not list(validator.iter_errors(definition)), definition
        assert not list(validator.iter_errors(parse_job(definition).wire())), definition
    envelope = {"definition": definitions[0], "namespace": "cell:abc", "rerun": True}
    submission = schema_validator(doc, "Submission")
    for body in (definitions[0], envelope, [envelope, definitions[1]]):
        assert submission.is_valid(body), body


@pytest.mark.parametrize(
    "definition",
    [
        {},
        {"image": "x", "build": {"dockerfile": "FROM x"}},
        {"image": "x", "bogus": 1},
        {"image": "x", "requirements": {"cpus": 0}},
        {"image": "x", "inputs": {"a.txt": {"type": "utf8", "value": 3}}},
        {"image": "x", "inputs": {"a.txt": {"type": "pdf", "value": "x"}}},
        {"build": {"target": "x"}},
    ],
)
def test_definitions_the_host_refuses_do_not_fit_the_schema(
    doc: dict[str, Any], definition: Any
) -> None:
    with pytest.raises(ValueError):
        parse_job(definition)
    assert not schema_validator(doc, "JobDefinition").is_valid(definition)


def test_run_records_and_answers_fit_the_schema(doc: dict[str, Any]) -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    minimal = RunRecord(
        run_id="r1", job_id="cd" * 32, queue="demo", state=RunState.QUEUED, queued_at=now
    )
    full = minimal.model_copy(
        update={
            "state": RunState.FINISHED,
            "phase": Phase.UPLOADING,
            "reason": Reason.SUCCESS,
            "exit_code": 0,
            "message": "done",
            "namespaces": ["_", "cell:x"],
            "attempt": 2,
            "lost_count": 1,
            "worker": WorkerRef(id="w1", version="0.1.0"),
            "image_digest": "sha256:" + "ef" * 32,
            "cached": True,
            "outputs": {"a/b.txt": OutputRef(key="ab" * 32, size=3)},
            "log_bytes": 10,
            "started_at": now,
            "finished_at": now,
        }
    )
    records = schema_validator(doc, "RunRecord")
    for record in (minimal, full):
        assert not list(records.iter_errors(record.wire())), record
    answer = QueueService._answer(None, full)  # type: ignore[arg-type]
    answers = schema_validator(doc, "SubmitAnswer")
    assert set(answer) == set(doc["components"]["schemas"]["SubmitAnswer"]["required"])
    assert answers.is_valid({**answer, "url": "http://h/compute-queue/" + answer["url"]})
