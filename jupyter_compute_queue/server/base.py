"""What every compute-queue handler shares: who is calling, JSON in and out, errors as JSON.

Handlers establish the caller's identity (a Jupyter user, a worker token, or nobody) and leave
every decision about what that identity may do to the service's access policy.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from jupyter_server.auth.decorator import allow_unauthenticated
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado import web

from ..access import ANONYMOUS, Identity, worker_identity
from ..blobs.base import BlobError, BlobHashMismatch, BlobNotFound, BlobTooLarge, InvalidBlobKey
from ..service import Forbidden, QueueService, ServiceError
from ..store.base import Conflict, NotFound

if TYPE_CHECKING:
    from .app import ComputeQueueApp

__all__ = ["BaseHandler", "allow_unauthenticated"]

JOB_ID_RE = re.compile(r"^[0-9a-f]{64}$")
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
    def cq(self) -> ComputeQueueApp:
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
        try:
            return json.loads(self.request.body or b"null")
        except (UnicodeDecodeError, ValueError) as exc:
            raise web.HTTPError(400, f"the body is not valid JSON: {exc}") from None

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
