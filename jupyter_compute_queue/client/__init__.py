"""The Python client: ``Client``, ``Job``, live logs, uploads, host discovery and its errors.

``from jupyter_compute_queue.client import Client`` (or from the package itself). The names are
imported lazily, so a worker that needs only :mod:`.http` does not load the whole client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import Client, Job
    from .errors import ComputeQueueError

__all__ = ["Client", "ComputeQueueError", "Job"]


def __getattr__(name: str) -> Any:
    if name == "Client":
        from .client import Client

        return Client
    if name == "Job":
        from .client import Job

        return Job
    if name == "ComputeQueueError":
        from .errors import ComputeQueueError

        return ComputeQueueError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
