"""Public compute queues for notebooks: container jobs from Jupyter, run by anyone's workers."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    """The server extension (imported lazily: a kernel importing the package stays light)."""
    from .server.app import ComputeQueueApp

    return [{"module": "jupyter_compute_queue", "app": ComputeQueueApp}]
