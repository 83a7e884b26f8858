"""The REST routes of SPEC §7, declared once: each as an OpenAPI path template with its
handler (checked against docs/openapi.yaml), and the URL patterns made from them.

The handlers themselves are thin, over the queue service, one module per route family:
``queue_routes`` (submit, list, status, metrics), ``job_routes`` (a job, its runs, parts and
files), ``blob_routes`` (``f/{key}``) and ``ui`` (the queue page and worker tokens). Here are only
the two that concern no resource: the health check and the JSON 404.
"""

from __future__ import annotations

import re
from typing import Any

from tornado import web

from .base import BaseHandler, allow_unauthenticated
from .blob_routes import BlobExistsHandler, BlobHandler
from .job_routes import (
    CancelHandler,
    CopyHandler,
    JobFileHandler,
    JobHandler,
    JobPartHandler,
    OutputsZipHandler,
    QueueJobHandler,
)
from .queue_routes import MetricsHandler, QueueHandler, StatusHandler
from .ui import UIAssetHandler, UIPageHandler, WorkerTokenHandler

API = r"/compute-queue"


class HealthHandler(BaseHandler):
    """Liveness: never needs credentials, reveals nothing."""

    @allow_unauthenticated
    def get(self) -> None:
        self.send_json({"ok": True})

    async def prepare(self) -> None:  # type: ignore[override]
        """No identity, no service: liveness must answer even while the store opens."""


class NoRouteHandler(BaseHandler):
    """Anything else under ``compute-queue/``: a JSON 404 instead of an HTML page."""

    async def prepare(self) -> None:  # type: ignore[override]
        raise web.HTTPError(404, f"no route {self.request.path!r}; see docs/openapi.yaml")


#: Every HTTP route as an OpenAPI path template (the source of both the server's URL patterns
#: and the check against docs/openapi.yaml), most specific first.
ROUTES: list[tuple[str, type[BaseHandler]]] = [
    ("healthz", HealthHandler),
    ("f/{key}/exists", BlobExistsHandler),
    ("f/{key}", BlobHandler),
    ("q/{queue}/status", StatusHandler),
    ("q/{queue}/metrics", MetricsHandler),
    ("q/{queue}/worker-token", WorkerTokenHandler),
    ("ui/", UIPageHandler),
    ("ui/{asset}", UIAssetHandler),
    ("q/{queue}", QueueHandler),
    ("q/{queue}/j", QueueHandler),
    ("j/{job}/copy", CopyHandler),
    *[
        (prefix + suffix, handler)
        for prefix in ("q/{queue}/j/{job}", "j/{job}")
        for suffix, handler in [
            ("/cancel", CancelHandler),
            ("/outputs.zip", OutputsZipHandler),
            ("/{kind}/{path}", JobFileHandler),
            ("/{part}", JobPartHandler),
        ]
    ],
    ("q/{queue}/j/{job}", QueueJobHandler),
    ("j/{job}", JobHandler),
]

#: The regular expression of each path parameter.
PARAMETERS = {
    "key": r"[^/]+",
    "queue": r"[^/]+",
    "job": r"[^/]+",
    "kind": r"inputs|outputs",
    "path": r".+",
    "part": r"definition\.json|result\.json|namespaces\.json|logs",
    "asset": r"[A-Za-z0-9._-]+",
}


def _pattern(template: str) -> str:
    def parameter(match: re.Match[str]) -> str:
        name = match.group(1)
        return f"(?P<{name}>{PARAMETERS[name]})"

    return re.sub(
        r"\{(\w+)\}", parameter, re.escape(template).replace(r"\{", "{").replace(r"\}", "}")
    )


def routes() -> list[tuple[str, type[Any]]]:
    """The URL patterns of every route and websocket under ``compute-queue/``, then a JSON 404
    for anything else."""
    from .websockets import QueueSocket, WorkerSocket

    sockets: list[tuple[str, type[Any]]] = [("q/{queue}/ws", QueueSocket), ("worker", WorkerSocket)]
    return (
        [(f"{API}/{_pattern(t)}", h) for t, h in sockets]
        + [(pattern, handler) for _, pattern, handler in http_patterns()]
        + [(rf"{API}(?:/.*)?", NoRouteHandler)]
    )


def http_patterns() -> list[tuple[str, str, type[BaseHandler]]]:
    """(template, URL pattern, handler) of every HTTP route, in matching order."""
    return [(t, f"{API}/{_pattern(t)}", h) for t, h in ROUTES]
