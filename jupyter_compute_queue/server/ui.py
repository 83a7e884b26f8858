"""The job page (``ui/``), its script, and the worker command the sidebar offers.

The page is a static shell: no job data is in it, so it needs no credentials; its script
(``ui/page.js``, built from ``labextension/src/page.ts``) reads the job through the REST API and
the queue websocket with the browser's own credentials (the Jupyter login cookie), or none on a
public queue. The host tells the page whether it is in public mode, since a page never
autostarts a job on a private queue (SPEC §8, §9).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from tornado import web

from .._version import __version__
from ..host.access import check_queue_name, worker_credential
from .base import BaseHandler, allow_unauthenticated

STATIC = Path(__file__).resolve().parent / "static"
#: The files ``ui/{asset}`` serves, and their types.
ASSETS = {"page.js": "text/javascript; charset=utf-8"}

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Compute queue job</title>
<style>
body {{ margin: 0; font-family: system-ui, sans-serif; background: #fff; color: #222; }}
#jcq-page {{ max-width: 1100px; margin: 0 auto; padding: 16px; }}
</style>
</head>
<body>
<main id="jcq-page" data-config="{config}"><p>Loading the job…</p></main>
<script type="module" src="page.js?v={version}"></script>
<noscript>This page needs JavaScript to show the job.</noscript>
</body>
</html>
"""

#: What the page may load and reach: its own script, the host's API and websocket, images it
#: makes from outputs (blob:), and the styles the terminal injects.
CSP = (
    "default-src 'none'; script-src 'self'; connect-src 'self' ws: wss:; "
    "img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; font-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
)


class UIPageHandler(BaseHandler):
    """``GET ui/``: the job page (SPEC §9)."""

    @allow_unauthenticated
    async def get(self) -> None:
        # Touch the XSRF token so the page's POSTs (cancel, run) can send it back.
        self.xsrf_token  # noqa: B018
        config = {
            "baseUrl": self.base_url,
            "public": bool(self.cq.public),
            "version": __version__,
        }
        self.set_header("Content-Security-Policy", CSP)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Cache-Control", "no-cache")
        page = PAGE.format(config=html.escape(json.dumps(config), quote=True), version=__version__)
        self.finish(page, set_content_type="text/html; charset=utf-8")


class UIAssetHandler(BaseHandler):
    """``GET ui/{asset}``: the page's script (built with the front end)."""

    @allow_unauthenticated
    async def get(self, asset: str) -> None:
        kind = ASSETS.get(asset)
        path = STATIC / asset
        if kind is None or not path.is_file():
            raise web.HTTPError(404, f"no asset {asset!r} (the front end may not be built)")
        self.set_header("X-Content-Type-Options", "nosniff")
        # The page asks for ?v=<version>: a new release is a new URL.
        self.set_header("Cache-Control", "public, max-age=86400")
        self.finish(path.read_bytes(), set_content_type=kind)


class WorkerTokenHandler(BaseHandler):
    """``GET q/{queue}/worker-token``: the credential and the command that start a worker for
    the queue — for the host's own users only (never an anonymous or worker caller)."""

    async def get(self, queue: str) -> None:
        if self.identity.kind != "user":  # no credentials: 401 (log in); a worker's: 403
            status = 401 if self.identity.kind == "anonymous" else 403
            raise web.HTTPError(status, "only the host's users may see worker tokens")
        try:
            check_queue_name(queue)
        except ValueError as exc:
            raise web.HTTPError(400, f"queue: {exc}") from None
        token = worker_credential(self.cq.secret, queue)
        url = self.public_base().removesuffix("compute-queue/")
        command = f"jupyter compute-queue worker {queue} --url {url} --token {token}"
        self.send_json({"queue": queue, "token": token, "url": url, "command": command})
