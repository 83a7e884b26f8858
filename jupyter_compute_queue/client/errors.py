"""The errors of the client (:mod:`jupyter_compute_queue.client`)."""

from __future__ import annotations

__all__ = ["ComputeQueueError", "HostNotFound", "JobTimeout"]


class ComputeQueueError(Exception):
    """A request failed. ``message`` is the host's ``{"error"}`` text (or what went wrong on
    the way), ``status`` the HTTP status (None when there was no answer), ``url`` the URL
    without its query."""

    def __init__(self, message: str, status: int | None = None, url: str | None = None) -> None:
        self.message = message
        self.status = status
        self.url = url
        super().__init__(f"{message} (HTTP {status})" if status is not None else message)


class HostNotFound(ComputeQueueError):
    """No host was found; ``tried`` lists every place discovery looked, and why it failed."""

    def __init__(self, tried: list[str]) -> None:
        self.tried = list(tried)
        lines = "\n".join(f"  - {line}" for line in tried)
        super().__init__(
            "no compute-queue host found. Looked at:\n"
            f"{lines}\n"
            "Pass Client(url=…, token=…), or set COMPUTE_QUEUE_URL (the Jupyter server URL "
            "including its base URL) and COMPUTE_QUEUE_TOKEN."
        )


class JobTimeout(ComputeQueueError, TimeoutError):
    """A job did not finish (or its log did not end) within the time given."""


# --- small helpers --------------------------------------------------------------------------
