"""Who may call what (SPEC §7, §8), against a real Jupyter server: the access matrix of every
route of ``ROUTES`` with each of its verbs, times each kind of caller, then the rows SPEC names.

Matrix columns (who is calling):

- ``none``: no credentials at all, on a private host (the default);
- ``token``: the Jupyter token in ``Authorization: token …``;
- ``cookie``: a real login cookie from the login form, and no XSRF token;
- ``worker``: a worker credential ``QUEUE:TOKEN`` for the queue of the row;
- ``public``: no credentials, on a host in public mode.

A cell is the exact status the row must answer; ``XSRF`` is a 403 from the XSRF check.

The data behind the rows: job ``A`` ran (Success, output ``out.txt``, input ``in.txt``) in the
public-capable queue ``q1``, job ``L`` likewise in the private queue ``local``; ``K`` is a stored
blob and ``U`` the key of the blob a PUT uploads. The worker credential of a row is for the queue
in its path, or the queue its job ran in (q1 for blob rows). ``j/A/copy to local`` posts
``{"queue": "local"}``.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import urllib.parse
import zipfile
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any, NamedTuple

import pytest
from jupyter_server.serverapp import ServerApp
from tornado.httpclient import HTTPClientError, HTTPResponse

from jupyter_compute_queue.host.access import Identity, worker_credential, worker_token
from jupyter_compute_queue.host.store.base import Assignment, Outcome, WorkerInfo
from jupyter_compute_queue.model.capacity import Capacity
from jupyter_compute_queue.model.runs import OutputRef, Reason
from jupyter_compute_queue.server.app import ComputeQueueApp
from jupyter_compute_queue.server.base import BaseHandler
from jupyter_compute_queue.server.handlers import ROUTES, http_patterns

from .conftest import Fetch

XSRF = "xsrf"
Cell = int | str


class Row(NamedTuple):
    verb: str
    path: str  # under compute-queue/; A, L: the jobs, K: the blob; "… to Q": copy target
    none: Cell
    token: Cell
    cookie: Cell
    worker: Cell
    public: Cell


# fmt: off
MATRIX: list[Row] = [
    #   verb      path                           none  token cookie worker public
    Row("GET",    "healthz",                     200,  200,  200,  200,  200),
    Row("GET",    "f/K/exists",                  401,  200,  200,  200,  200),
    Row("PUT",    "f/U",                         401,  201,  XSRF, 201,  201),
    Row("GET",    "f/K",                         401,  200,  200,  200,  200),
    Row("HEAD",   "f/K",                         401,  200,  200,  200,  200),
    Row("GET",    "q/q1/status",                 401,  200,  200,  403,  200),
    Row("GET",    "q/local/status",              401,  200,  200,  403,  401),
    Row("GET",    "q/q1/metrics",                401,  200,  200,  403,  200),
    Row("GET",    "q/local/metrics",             401,  200,  200,  403,  401),
    Row("GET",    "q/q1/worker-token",           401,  200,  200,  403,  401),
    Row("GET",    "q/local/worker-token",        401,  200,  200,  403,  401),
    Row("GET",    "ui/",                         200,  200,  200,  200,  200),
    Row("GET",    "ui/page.js",                  200,  200,  200,  200,  200),
    Row("GET",    "q/q1",                        401,  200,  200,  403,  200),
    Row("GET",    "q/local",                     401,  200,  200,  403,  401),
    Row("POST",   "q/q1",                        401,  200,  XSRF, 403,  200),
    Row("POST",   "q/local",                     401,  200,  XSRF, 403,  401),
    Row("GET",    "q/q1/j",                      401,  200,  200,  403,  200),
    Row("GET",    "q/local/j",                   401,  200,  200,  403,  401),
    Row("POST",   "q/q1/j",                      401,  200,  XSRF, 403,  200),
    Row("POST",   "q/local/j",                   401,  200,  XSRF, 403,  401),
    Row("POST",   "j/A/copy to q1",              401 , 200,  XSRF, 403 , 200),
    Row("POST",   "j/A/copy to local",           401 , 200,  XSRF, 403 , 401),
    Row("POST",   "j/L/copy to q1",              401 , 200,  XSRF, 403 , 404),
    Row("GET",    "q/q1/j/A",                    401,  200,  200,  403,  200),
    Row("GET",    "q/local/j/L",                 401,  200,  200,  403,  401),
    Row("GET",    "q/q1/j/A/outputs.zip",        401,  200,  200,  403,  200),
    Row("GET",    "q/local/j/L/outputs.zip",     401,  200,  200,  403,  401),
    Row("GET",    "q/q1/j/A/inputs/in.txt",      401,  200,  200,  403,  200),
    Row("GET",    "q/local/j/L/inputs/in.txt",   401,  200,  200,  403,  401),
    Row("GET",    "q/q1/j/A/outputs/out.txt",    401,  200,  200,  403,  200),
    Row("GET",    "q/local/j/L/outputs/out.txt", 401,  200,  200,  403,  401),
    Row("GET",    "q/q1/j/A/definition.json",    401,  200,  200,  403,  200),
    Row("GET",    "q/local/j/L/definition.json", 401,  200,  200,  403,  401),
    Row("GET",    "q/q1/j/A/result.json",        401,  200,  200,  403,  200),
    Row("GET",    "q/local/j/L/result.json",     401,  200,  200,  403,  401),
    Row("GET",    "q/q1/j/A/namespaces.json",    401,  200,  200,  403,  200),
    Row("GET",    "q/local/j/L/namespaces.json", 401,  200,  200,  403,  401),
    Row("GET",    "q/q1/j/A/logs",               401,  200,  200,  403,  200),
    Row("GET",    "q/local/j/L/logs",            401,  200,  200,  403,  401),
    Row("GET",    "j/A",                         401 , 200,  200,  403 , 200),
    Row("GET",    "j/L",                         401 , 200,  200,  403 , 404),
    Row("GET",    "j/A/outputs.zip",             401 , 200,  200,  403 , 200),
    Row("GET",    "j/L/outputs.zip",             401 , 200,  200,  403 , 404),
    Row("GET",    "j/A/inputs/in.txt",           401 , 200,  200,  403 , 200),
    Row("GET",    "j/L/inputs/in.txt",           401 , 200,  200,  403 , 404),
    Row("GET",    "j/A/outputs/out.txt",         401 , 200,  200,  403 , 200),
    Row("GET",    "j/L/outputs/out.txt",         401 , 200,  200,  403 , 404),
    Row("GET",    "j/A/definition.json",         401 , 200,  200,  403 , 200),
    Row("GET",    "j/L/definition.json",         401 , 200,  200,  403 , 404),
    Row("GET",    "j/A/result.json",             401 , 200,  200,  403 , 200),
    Row("GET",    "j/L/result.json",             401 , 200,  200,  403 , 404),
    Row("GET",    "j/A/namespaces.json",         401 , 200,  200,  403 , 200),
    Row("GET",    "j/L/namespaces.json",         401 , 200,  200,  403 , 404),
    Row("GET",    "j/A/logs",                    401 , 200,  200,  403 , 200),
    Row("GET",    "j/L/logs",                    401 , 200,  200,  403 , 404),
    # Last, so that the reads above see the seeded runs as they were: cancel and forget.
    Row("POST",   "q/q1/j/A/cancel",             401,  200,  XSRF, 403,  200),
    Row("POST",   "q/local/j/L/cancel",          401,  200,  XSRF, 403,  401),
    Row("POST",   "j/A/cancel",                  401 , 200,  XSRF, 403 , 200),
    Row("POST",   "j/L/cancel",                  401 , 200,  XSRF, 403 , 404),
    Row("DELETE", "q/q1/j/A",                    401,  200,  XSRF, 403,  200),
    Row("DELETE", "q/local/j/L",                 401,  200,  XSRF, 403,  401),
]
# fmt: on
COLUMNS = ("none", "token", "cookie", "worker", "public")
VERBS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")

OWNER = Identity("user", "owner")
JOB_A = {
    "image": "busybox",
    "command": "echo a",
    "inputs": {"in.txt": {"type": "utf8", "value": "input of A"}},
}
JOB_L = {
    "image": "busybox",
    "command": "echo l",
    "inputs": {"in.txt": {"type": "utf8", "value": "input of L"}},
}
NEW_JOB = {"image": "busybox", "command": "echo submitted by the matrix"}
UPLOAD = b"uploaded by the matrix"
NOBODY = {"Authorization": ""}  # jp_fetch adds the Jupyter token unless told otherwise


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def body(response: HTTPResponse) -> Any:
    return json.loads(response.body)


# --- the host -------------------------------------------------------------------------------


@dataclass
class Host:
    """A running server: its token and secret, requests to it, and runs a worker finishes."""

    fetch: Fetch
    jp_fetch: Any
    server: ServerApp

    @property
    def cq(self) -> ComputeQueueApp:
        return self.server.web_app.settings["compute_queue"]  # type: ignore[no-any-return]

    @property
    def token(self) -> str:
        return str(self.server.identity_provider.token)

    def worker(self, credential: str) -> dict[str, str]:
        return {"Authorization": f"token {credential}"}

    def credential(self, queue: str) -> str:
        return worker_credential(self.cq.secret, queue)

    async def call(
        self, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> HTTPResponse:
        """``path`` under compute-queue/; ``headers`` None: the Jupyter token."""
        if method in ("POST", "PUT") and "json" not in kwargs and "body" not in kwargs:
            kwargs["body"] = b""
        return await self.fetch(path, method=method, headers=headers, **kwargs)

    async def upload(self, data: bytes) -> str:
        r = await self.call("PUT", f"f/{sha(data)}", body=data)
        assert r.code == 201, r.body
        return sha(data)

    async def submit(self, queue: str, definition: dict[str, Any]) -> dict[str, Any]:
        r = await self.call("POST", f"q/{queue}", json=definition)
        assert r.code == 200, r.body
        return body(r)  # type: ignore[no-any-return]

    async def run(self, queue: str, definition: dict[str, Any], output: bytes) -> dict[str, Any]:
        """Submit with the token, then a worker finishes the run: Success, a log line and the
        output ``out.txt``. The submission's answer."""
        answer = await self.submit(queue, definition)
        key = await self.upload(output)
        service = await self.cq.ready()
        got: list[Assignment] = []

        async def deliver(assignment: Assignment) -> None:
            got.append(assignment)

        async def stop(run_id: str) -> None:
            pass

        run_id = answer["runId"]
        info = WorkerInfo(f"w-{run_id[:12]}", (queue,), Capacity(64))
        await service.connect_worker(OWNER, info, [], deliver, stop)
        await service.report_free(info.worker_id, info.capacity)
        [fence] = [a.fence for a in got if a.record.run_id == run_id]
        service.append_logs(info.worker_id, run_id, fence, [("out", f"log of {queue}\n", None)])
        outcome = Outcome(
            Reason.SUCCESS, 0, outputs={"out.txt": OutputRef(key=key, size=len(output))}
        )
        await service.finish(info.worker_id, run_id, fence, outcome)
        await service.disconnect_worker(info.worker_id, graceful=True)
        return answer

    async def login_cookie(self) -> str:
        """A real login: the login form's XSRF cookie, then the token as the password. The
        login cookie alone, as a ``Cookie`` header value."""
        page = await self.raw("GET", "login")
        assert page.code == 200, page.code
        xsrf = set_cookies(page)["_xsrf"]
        done = await self.raw(
            "POST",
            "login",
            body=urllib.parse.urlencode({"_xsrf": xsrf, "password": self.token}),
            headers={"Cookie": f"_xsrf={xsrf}"},
        )
        assert done.code == 302, (done.code, done.body)
        [login] = [(n, v) for n, v in set_cookies(done).items() if n != "_xsrf" and v]
        return "=".join(login)

    async def raw(self, method: str, path: str, **kwargs: Any) -> HTTPResponse:
        """A request under the base URL, without credentials unless given."""
        try:
            return await self.jp_fetch(  # type: ignore[no-any-return]
                path,
                method=method,
                headers={**NOBODY, **kwargs.pop("headers", {})},
                raise_error=False,
                follow_redirects=False,
                **kwargs,
            )
        except HTTPClientError as exc:  # tornado raises for redirects
            assert exc.response is not None
            return exc.response


def set_cookies(response: HTTPResponse) -> dict[str, str]:
    jar: SimpleCookie = SimpleCookie()
    for header in response.headers.get_list("Set-Cookie"):
        jar.load(header)
    return {name: morsel.value for name, morsel in jar.items()}


@pytest.fixture
async def host(fetch: Fetch, jp_fetch: Any, jp_serverapp: ServerApp) -> Host:
    made = Host(fetch, jp_fetch, jp_serverapp)
    await made.cq.ready()
    return made


def error_problem(response: HTTPResponse, method: str = "GET") -> str | None:
    """Why an error response is not ``{"error": "<message>"}`` as JSON (None when it is)."""
    if response.code < 400 or method == "HEAD":
        return None
    kind = response.headers.get("Content-Type", "")
    if not kind.startswith("application/json"):
        return f"Content-Type {kind!r}"
    try:
        data = json.loads(response.body)
    except ValueError:
        return f"not JSON: {response.body[:200]!r}"
    if not (isinstance(data, dict) and set(data) == {"error"} and isinstance(data["error"], str)):
        return f"not {{'error': str}}: {data!r}"
    return None if data["error"] else "an empty error message"


# --- the matrix -----------------------------------------------------------------------------


def route_of(row: Row) -> str:
    """The template of ROUTES that serves a row's path (the first that matches, as tornado)."""
    path = "/compute-queue/" + row.path.split(" to ")[0]
    for template, pattern, _ in http_patterns():
        if re.fullmatch(pattern, path):
            return template
    raise AssertionError(f"no route serves {row.path}")


def test_the_matrix_has_every_route_and_verb() -> None:
    """Each (template, verb) the server answers is a row, and no row is made up."""
    served = {
        (template, verb)
        for template, handler in ROUTES
        for verb in VERBS
        if getattr(handler, verb.lower()) is not getattr(BaseHandler, verb.lower())
    }
    assert {(route_of(row), row.verb) for row in MATRIX} == served
    assert len(set(MATRIX)) == len(MATRIX)


def request_of(row: Row, ids: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """The real path and the request arguments of a row."""
    path, _, target = row.path.partition(" to ")
    names = {"A": ids["A"], "L": ids["L"], "K": ids["K"], "U": sha(UPLOAD)}
    path = "/".join(names.get(part, part) for part in path.split("/"))
    kwargs: dict[str, Any] = {}
    if row.verb == "PUT":
        kwargs["body"] = UPLOAD
    elif target:
        kwargs["json"] = {"queue": target}
    elif row.verb == "POST" and "/j/" not in path and not path.startswith("j/"):
        kwargs["json"] = NEW_JOB
    return path, kwargs


def queue_of(row: Row) -> str:
    """The queue a row is about: the one in its path, or where its job ran (q1 for blobs)."""
    parts = row.path.split("/")
    if parts[0] == "q":
        return parts[1]
    return "local" if parts[:2] == ["j", "L"] else "q1"


def headers_of(column: str, host: Host, row: Row, cookie: str) -> dict[str, str] | None:
    """The credentials of a column (None: jp_fetch's Jupyter token header)."""
    if column == "token":
        return None
    if column == "cookie":
        return {**NOBODY, "Cookie": cookie}
    if column == "worker":
        return host.worker(host.credential(queue_of(row)))
    return NOBODY


def check_cell(row: Row, column: str, r: HTTPResponse) -> str | None:
    """What is wrong with the answer, or None."""
    cell: Cell = getattr(row, column)
    want = 403 if cell == XSRF else cell
    where = f"row {MATRIX.index(row)}: {row.verb} {row.path} [{column}]"
    detail = r.body[:200] if row.verb != "HEAD" else b""
    problem = error_problem(r, row.verb)
    if problem is not None:
        return f"{where}: the error body is wrong: {problem}"
    if r.code != want:
        return f"{where}: expected {want}, got {r.code} {detail!r}"
    if cell == XSRF and "_xsrf" not in body(r)["error"]:
        return f"{where}: expected the XSRF check to refuse it, got {body(r)}"
    if r.code == 401 and "WWW-Authenticate" not in r.headers:
        return f"{where}: a 401 without WWW-Authenticate"
    return None


@pytest.mark.parametrize(
    ("column", "cq_config"),
    [
        ("none", {}),
        ("token", {}),
        ("cookie", {}),
        ("worker", {}),
        ("public", {"public": True}),
    ],
    ids=COLUMNS,
)
async def test_access_matrix(host: Host, column: str) -> None:
    ids = {
        "A": (await host.run("q1", JOB_A, b"output of A"))["jobId"],
        "L": (await host.run("local", JOB_L, b"output of L"))["jobId"],
        "K": await host.upload(b"a blob to read"),
    }
    cookie = await host.login_cookie() if column == "cookie" else ""
    failures: list[str] = []
    for row in MATRIX:
        path, kwargs = request_of(row, ids)
        response = await host.call(row.verb, path, headers_of(column, host, row, cookie), **kwargs)
        problem = check_cell(row, column, response)
        if problem is not None:
            failures.append(problem)
    assert not failures, "\n".join(failures)


async def test_the_login_cookie_is_what_logs_in(host: Host) -> None:
    """The cookie column means something: the cookie alone reads a private queue, a tampered
    one is nobody's, and with the XSRF token of the login form the cookie may write too."""
    cookie = await host.login_cookie()
    r = await host.call("GET", "q/local", {**NOBODY, "Cookie": cookie})
    assert r.code == 200, r.body
    r = await host.call("GET", "q/local", {**NOBODY, "Cookie": cookie[:-2] + "xx"})
    assert r.code == 401 and error_problem(r) is None, r.body
    form = set_cookies(await host.raw("GET", "login"))["_xsrf"]
    headers = {**NOBODY, "Cookie": f"{cookie}; _xsrf={form}", "X-XSRFToken": form}
    r = await host.call("POST", "q/local", headers, json=NEW_JOB)
    assert r.code == 200, r.body


async def test_a_401_names_how_to_authenticate(host: Host) -> None:
    r = await host.call("GET", "q/q1", NOBODY)
    assert r.code == 401 and "Authorization: token" in body(r)["error"]
    assert r.headers.get("WWW-Authenticate") == 'token realm="compute-queue"'


# --- copy and visibility in public mode -----------------------------------------------------


PUBLIC = pytest.mark.parametrize("cq_config", [{"public": True}])


@PUBLIC
async def test_copy_across_the_private_line(host: Host) -> None:
    a = (await host.run("q1", JOB_A, b"output of A"))["jobId"]
    local = (await host.run("local", JOB_L, b"output of L"))["jobId"]

    # Copying a public job into `local` anonymously: refused, and nothing is queued there.
    r = await host.call("POST", f"j/{a}/copy", NOBODY, json={"queue": "local"})
    assert r.code == 401 and error_problem(r) is None, r.body
    assert "local" in body(r)["error"]
    r = await host.call("GET", "q/local")
    assert [run["jobId"] for run in body(r)["runs"]] == [local]

    # Copying from `local` into a public queue anonymously: the job is invisible.
    r = await host.call("POST", f"j/{local}/copy", NOBODY, json={"queue": "q1"})
    assert r.code == 404 and error_problem(r) is None, r.body
    assert "output of L" not in r.body.decode() and "echo l" not in r.body.decode()
    r = await host.call("GET", "q/q1")
    assert local not in [run["jobId"] for run in body(r)["runs"]]

    # Between public queues an anonymous copy is fine; with the token, into `local` too.
    r = await host.call("POST", f"j/{a}/copy", NOBODY, json={"queue": "q2"})
    assert r.code == 200 and body(r)["queue"] == "q2", r.body
    r = await host.call("POST", f"j/{a}/copy", json={"queue": "local"})
    assert r.code == 200 and body(r)["queue"] == "local", r.body


@PUBLIC
async def test_an_anonymous_caller_sees_only_public_runs(host: Host) -> None:
    local = (await host.run("local", JOB_L, b"output of L"))["jobId"]
    r = await host.call("GET", f"j/{local}", NOBODY)
    assert r.code == 404 and error_problem(r) is None, r.body
    r = await host.call("GET", f"j/{local}")
    assert r.code == 200 and [run["queue"] for run in body(r)["runs"]] == ["local"]

    # A job that ran in q1, then (newer) in local: anonymous callers see the q1 run only.
    both = (await host.run("q1", JOB_A, b"A in q1"))["jobId"]
    await host.run("local", JOB_A, b"A in local")
    r = await host.call("GET", f"j/{both}")
    assert sorted(run["queue"] for run in body(r)["runs"]) == ["local", "q1"]
    r = await host.call("GET", f"j/{both}", NOBODY)
    assert r.code == 200 and [run["queue"] for run in body(r)["runs"]] == ["q1"], r.body
    r = await host.call("GET", f"j/{both}/result.json")
    assert body(r)["queue"] == "local"  # the newest run, for the owner
    r = await host.call("GET", f"j/{both}/result.json", NOBODY)
    assert body(r)["queue"] == "q1"
    r = await host.call("GET", f"j/{both}/outputs/out.txt", NOBODY)
    assert r.code == 200 and r.body == b"A in q1"
    r = await host.call("GET", f"j/{both}/outputs.zip", NOBODY)
    with zipfile.ZipFile(io.BytesIO(r.body)) as archive:
        assert archive.read("out.txt") == b"A in q1"
    r = await host.call("GET", f"j/{both}/logs", NOBODY)
    assert r.body == b"log of q1\n"
    r = await host.call("POST", f"j/{both}/cancel", NOBODY)
    assert r.code == 200 and [run["queue"] for run in body(r)["runs"]] == ["q1"], r.body
    # Naming the queue does not help: local refuses, q1 does not know the local-only job.
    r = await host.call("GET", f"q/local/j/{both}", NOBODY)
    assert r.code == 401 and error_problem(r) is None
    r = await host.call("GET", f"q/q1/j/{local}", NOBODY)
    assert r.code == 404 and error_problem(r) is None


@PUBLIC
async def test_a_request_with_cookies_is_xsrf_checked_in_public_mode(host: Host) -> None:
    """Without cookies an anonymous POST skips the XSRF check; with any cookie it does not."""
    r = await host.call("POST", "q/q1", NOBODY, json=NEW_JOB)
    assert r.code == 200, r.body
    r = await host.call("POST", "q/q1", {**NOBODY, "Cookie": "theme=dark"}, json=NEW_JOB)
    assert r.code == 403 and error_problem(r) is None and "_xsrf" in body(r)["error"], r.body


# --- the cache across a private and a public queue ------------------------------------------


@pytest.mark.parametrize(
    ("cq_config", "shared"),
    [({"cache_scope": "host"}, True), ({"cache_scope": "queue"}, False)],
)
async def test_a_private_host_shares_results_across_queues_when_told(
    host: Host, shared: bool
) -> None:
    await host.run("local", NEW_JOB, b"result")
    answer = await host.submit("q1", NEW_JOB)
    assert answer["cached"] is shared, answer
    assert (answer["state"] == "Finished") is shared, answer


@pytest.mark.parametrize("cq_config", [{"public": True, "cache_scope": "host"}])
async def test_a_public_queue_never_answers_with_a_local_result(host: Host) -> None:
    done = await host.run("local", NEW_JOB, b"private result")
    for headers in (NOBODY, None):  # anonymous, then the owner: the queue decides, not who
        r = await host.call("POST", "q/q1", headers, json=NEW_JOB)
        assert r.code == 200, r.body
        answer = body(r)
        assert answer["cached"] is False and answer["state"] == "Queued", answer
        assert answer["queue"] == "q1" and answer["runId"] != done["runId"], answer
    r = await host.call("GET", f"j/{done['jobId']}", NOBODY)
    assert [run["queue"] for run in body(r)["runs"]] == ["q1"], r.body
    # q1's own result is its cache, of course.
    own = await host.run("q2", JOB_A, b"public result")
    r = await host.call("POST", "q/q2", NOBODY, json=JOB_A)
    assert body(r)["cached"] is True and body(r)["runId"] == own["runId"], r.body


# --- worker credentials ---------------------------------------------------------------------


@pytest.mark.parametrize("cq_config", [{}, {"public": True}], ids=["private", "public"])
async def test_a_worker_credential_opens_blobs_and_no_more(
    host: Host, cq_config: dict[str, Any]
) -> None:
    key = await host.upload(b"a blob")
    job = (await host.run("q1", JOB_A, b"output of A"))["jobId"]
    secret = host.cq.secret
    valid = host.credential("q1")
    forged = f"local:{worker_token(secret, 'q1')}"  # q1's token relabelled as local's
    forged_q1 = f"q1:{worker_token(secret, 'local')}"
    half = f"{valid},local:{'0' * 64}"  # one good part and one bad: all refused
    anonymous = 200 if cq_config.get("public") else 401  # what nobody gets on q1 and blobs
    # A credential opens no less than none at all: in public mode q1 is open to it too.
    worker = 200 if cq_config.get("public") else 403
    # fmt: off
    rows = [
        # credential      verb    path                  status
        (valid,           "GET",  f"f/{key}",           200),
        (valid,           "PUT",  f"f/{sha(UPLOAD)}",   201),
        (valid,           "GET",  "q/q1",               worker),
        (valid,           "POST", "q/q1",               worker),
        (valid,           "GET",  "q/q1/status",        worker),
        (valid,           "GET",  f"q/q1/j/{job}",      worker),
        (valid,           "GET",  f"q/q1/j/{job}/logs", worker),
        (valid,           "POST", f"q/q1/j/{job}/cancel", worker),
        (forged,          "GET",  f"f/{key}",           anonymous),
        (forged,          "GET",  "q/local",            401),
        (forged,          "GET",  "q/q1",               anonymous),
        (forged_q1,       "GET",  "q/q1",               anonymous),
        (forged_q1,       "POST", "q/q1",               anonymous),
        (half,            "GET",  f"f/{key}",           anonymous),
        (half,            "GET",  "q/q1",               anonymous),
    ]
    # fmt: on
    failures = []
    for i, (credential, verb, path, status) in enumerate(rows):
        kwargs: dict[str, Any] = {"json": NEW_JOB} if verb == "POST" else {}
        if verb == "PUT":
            kwargs = {"body": UPLOAD}
        r = await host.call(verb, path, host.worker(credential), **kwargs)
        problem = error_problem(r, verb)
        if r.code != status or problem:
            failures.append(f"row {i}: {verb} {path}: expected {status}, got {r.code} {problem}")
    assert not failures, "\n".join(failures)
    # The credential also works as ``Bearer`` and as ``?token=`` (as a worker would send it).
    r = await host.call("GET", f"f/{key}", {"Authorization": f"Bearer {valid}"})
    assert r.code == 200, r.body
    r = await host.call("GET", f"f/{key}", NOBODY, params={"token": valid})
    assert r.code == 200, r.body


# --- every error is {"error": …} ------------------------------------------------------------


async def test_every_error_body_is_json(host: Host) -> None:
    key = await host.upload(b"a blob")
    job = (await host.run("q1", JOB_A, b"output of A"))["jobId"]
    missing = "0" * 64
    # fmt: off
    rows = [
        # verb      path                          headers  body                 status
        ("GET",     "no/such/route",              None,    None,                404),
        ("PATCH",   "q/q1",                       None,    b"{}",               405),
        ("GET",     "j/not-a-job-id",             None,    None,                400),
        ("GET",     "q/bad..name!/status",        None,    None,                400),
        ("GET",     f"j/{missing}",               None,    None,                404),
        ("GET",     f"q/q1/j/{missing}",          None,    None,                404),
        ("GET",     f"j/{job}/outputs/nothing",   None,    None,                404),
        ("GET",     f"j/{job}/logs?format=html",  None,    None,                400),
        ("POST",    "q/q1",                       None,    b"not json",         400),
        ("POST",    "q/q1",                       None,    b'{"image": 1}',     400),
        ("POST",    f"j/{job}/copy",              None,    b"{}",               400),
        ("GET",     "f/NOT-A-KEY",                None,    None,                400),
        ("GET",     f"f/{missing}",               None,    None,                404),
        ("PUT",     f"f/{key[::-1]}",             None,    b"a blob",           400),
        ("GET",     "q/q1",                       NOBODY,  None,                401),
        ("POST",    "q/q1",                       NOBODY,  b"{}",               401),
        ("GET",     f"q/q1/j/{job}/outputs.zip",  NOBODY,  None,                401),
    ]
    # fmt: on
    failures = []
    for i, (verb, path, headers, data, status) in enumerate(rows):
        path, _, query = path.partition("?")
        params = dict(urllib.parse.parse_qsl(query))
        kwargs: dict[str, Any] = {} if data is None else {"body": data}
        r = await host.call(verb, path, headers, params=params, **kwargs)
        problem = error_problem(r, verb)
        if r.code != status or problem:
            failures.append(f"row {i}: {verb} {path}: expected {status}, got {r.code}: {problem}")
    assert not failures, "\n".join(failures)
