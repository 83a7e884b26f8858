"""What every compute-queue handler shares: who is calling, JSON in and out, errors as JSON.

Handlers establish the caller's identity (a Jupyter user, a worker token, or nobody) and leave
every decision about what that identity may do to the service's access policy.
"""

from __future__ import annotations

import json
import math
import re
from typing import TYPE_CHECKING, Any, Protocol

from jupyter_server.auth.decorator import allow_unauthenticated
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado import web

from ..host.access import ANONYMOUS, Identity, worker_identity
from ..host.blobs.base import (
    BlobError,
    BlobHashMismatch,
    BlobNotFound,
    BlobTooLarge,
    InvalidBlobKey,
)
from ..host.limits import Limits, TooManyRequests
from ..host.service import Forbidden, QueueService, ServiceError
from ..host.store.base import Conflict, NotFound
from ..model.canonical import lone_surrogate, surrogate_message

__all__ = ["BaseHandler", "allow_unauthenticated", "whole_number"]

JOB_ID_RE = re.compile(r"^[0-9a-f]{64}$")
#: JSON bodies nested deeper than this are refused with a 400. Nothing the API takes is nearly
#: this deep (a ``json`` input's value starts at level 6), and the host's recursive helpers
#: (the canonical form of a definition) must not run out of stack on a body built to be deep.
MAX_JSON_DEPTH = 64
#: ASCII digits only: str.isdigit() also accepts '²' and other digits int() refuses.
_WHOLE_NUMBER_RE = re.compile(r"[0-9]+")
#: The authorization resource of every route (SPEC §8).
RESOURCE = "compute-queue"

_STATUS = [
    (NotFound, 404),
    (BlobNotFound, 404),
    (Conflict, 409),
    (InvalidBlobKey, 400),
    (BlobHashMismatch, 400),
    (BlobTooLarge, 413),
    # Last: any other failure of the blob store (S3 unreachable, refused) is a bad gateway,
    # with the store's message naming the object, not an anonymous 500.
    (BlobError, 502),
]


def whole_number(text: str | None) -> int | None:
    """The value of a query argument or header that must be a whole number, else None."""
    if text is None or _WHOLE_NUMBER_RE.fullmatch(text) is None:
        return None
    return int(text)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text} is out of range")
    return value


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def json_depth_over(value: Any, limit: int) -> bool:
    """Whether a parsed JSON value nests lists and objects deeper than ``limit`` (iterative:
    the point is not to recurse)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > limit:
                return True
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return False


#: A JSON escape of a UTF-16 surrogate (``\\ud800`` to ``\\udfff``): the only way text can hold a
#: lone one (UTF-8 cannot encode it), so the only texts worth walking for one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def surrogate_error(raw: str | bytes, value: Any) -> str | None:
    """What is wrong if ``value``, parsed from ``raw``, holds a lone UTF-16 surrogate (where,
    and which): SQLite, job ids and answers would all fail on it later. None if it holds none."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    if "\\u" not in text or not _SURROGATE_ESCAPE.search(text):
        return None
    found = lone_surrogate(value)
    if found is None:
        return None
    where, code = found
    return f"{where or 'the body'}: {surrogate_message(code)}"


class HostApp(Protocol):
    """What handlers read of the extension app (:class:`.app.ComputeQueueApp` is it): a
    protocol, so that the app can import the handlers and not the other way round."""

    public: bool
    public_url: str
    secret: bytes
    limits: Limits
    max_batch_size: int
    max_blob_bytes: int
    max_submission_bytes: int

    async def ready(self) -> QueueService: ...


if TYPE_CHECKING:
    _Handler = JupyterHandler
else:
    _Handler = object


class CallerMixin(_Handler):
    """Who is calling, and errors as ``{"error": …}``: shared by routes and websockets.

    Verbs are marked ``@allow_unauthenticated``: this mixin decides, since in public mode some
    callers rightly have no Jupyter credentials.
    """

    identity: Identity = ANONYMOUS
    service: QueueService

    @property
    def cq(self) -> HostApp:
        return self.settings["compute_queue"]  # type: ignore[no-any-return]

    async def resolve_caller(self) -> None:
        """Start the service if need be, and establish the identity of the caller."""
        self.service = await self.cq.ready()
        self.identity = self._identity()

    def _identity(self) -> Identity:
        user = self.current_user
        if user is not None:
            action = "read" if self.request.method in ("GET", "HEAD") else "write"
            if not self.authorizer.is_authorized(self, user, action, RESOURCE):
                raise web.HTTPError(403, f"user {user.username!r} may not {action} {RESOURCE}")
            return Identity("user", user.username)
        credential = self._bearer()
        if credential:
            worker = worker_identity(self.cq.secret, credential)
            if worker is not None:
                return worker
        return ANONYMOUS

    def _bearer(self) -> str:
        header = self.request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() in ("token", "bearer") and value:
            return value.strip()
        return self.get_query_argument("token", "") or ""

    def public_base(self) -> str:
        """The URL of the compute-queue API as people reach it, ending in a slash."""
        configured = self.cq.public_url
        if configured:
            root = configured.rstrip("/") + "/"
        else:
            root = f"{self.request.protocol}://{self.request.host}{self.base_url}"
        return root + "compute-queue/"

    def check_xsrf_cookie(self) -> None:
        """A request without cookies carries no ambient credential to forge: it is anonymous
        (or token-authenticated) and skips the XSRF check; one with cookies is checked."""
        if not self.request.headers.get("Cookie"):
            return
        super().check_xsrf_cookie()

    # --- errors -----------------------------------------------------------------------------

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Every error is ``{"error": message}`` with a precise status."""
        message = self._reason or "error"
        exc_info = kwargs.get("exc_info")
        if exc_info is not None:
            exc = exc_info[1]
            if isinstance(exc, web.HTTPError):
                message = exc.log_message or message
                if exc.args[1:]:
                    message = message % exc.args[1:]
            elif isinstance(exc, (ServiceError, *(kind for kind, _ in _STATUS))):
                message = str(exc)
            else:
                message = f"internal error ({type(exc).__name__}); the server log has details"
            if isinstance(exc, TooManyRequests):
                self.set_header("Retry-After", str(exc.retry_after))
        if status_code == 401:
            self.set_header("WWW-Authenticate", 'token realm="compute-queue"')
            message += "; send a Jupyter token (Authorization: token …) or log in"
        self.clear_header("Content-Disposition")
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": message}))

    def _handle_request_exception(self, e: BaseException) -> None:
        status = self._status_for(e)
        if status is not None and not self._finished:
            self.send_error(status, exc_info=(type(e), e, e.__traceback__))
            return
        super()._handle_request_exception(e)

    def _status_for(self, exc: BaseException) -> int | None:
        if isinstance(exc, Forbidden) and self.identity == ANONYMOUS:
            return 401  # nobody said who they are: ask for credentials rather than refuse
        if isinstance(exc, ServiceError):
            return exc.status
        for kind, status in _STATUS:
            if isinstance(exc, kind):
                return status
        return None


class BaseHandler(CallerMixin, ExtensionHandlerMixin, APIHandler):
    """A compute-queue REST route."""

    async def prepare(self) -> None:  # type: ignore[override]
        # Jupyter's own prepare resolves the user and checks XSRF (see check_xsrf_cookie).
        await super().prepare()
        await self.resolve_caller()

    # --- input and output -------------------------------------------------------------------

    def json_body(self) -> Any:
        """The request body as JSON; a 400 naming the problem otherwise."""
        too_deep = f"the body is nested deeper than {MAX_JSON_DEPTH} levels of lists and objects"
        try:
            # NaN, Infinity and 1e400 are no JSON numbers (Python's json takes them), and a
            # definition holding one could never be written in canonical form.
            value = json.loads(
                self.request.body or b"null", parse_float=_finite, parse_constant=_no_constant
            )
        except RecursionError:
            raise web.HTTPError(400, too_deep) from None
        except (UnicodeDecodeError, ValueError) as exc:
            raise web.HTTPError(400, f"the body is not valid JSON: {exc}") from None
        if json_depth_over(value, MAX_JSON_DEPTH):
            raise web.HTTPError(400, too_deep)
        bad = surrogate_error(self.request.body or b"", value)
        if bad is not None:
            raise web.HTTPError(400, bad)
        return value

    def finish(self, *args: Any, **kwargs: Any) -> Any:
        # Jupyter's API handlers declare every answer JSON; files and logs declare their own
        # type. Tornado's default (text/html) is never ours: it means "nobody set one".
        declared = str(self._headers.get("Content-Type", ""))
        if declared and not declared.startswith("text/html"):
            kwargs.setdefault("set_content_type", declared)
        return super().finish(*args, **kwargs)

    def send_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(data, ensure_ascii=False))

    def job_id(self, value: str) -> str:
        if not JOB_ID_RE.match(value):
            raise web.HTTPError(400, f"job id {value!r} is not 64 lowercase hex characters")
        return value
