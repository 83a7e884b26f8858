"""Public compute queues for notebooks: container jobs from Jupyter, run by anyone's workers.

``from jupyter_compute_queue import Client, Job`` for scripts; ``%load_ext
jupyter_compute_queue`` in a notebook for ``%%container``; ``jupyter_compute_queue.editor()``
for a form that composes a job. All are imported lazily, so a Jupyter server loading the
extension does not import the client, and a kernel does not import the server.

The sides of the package (docs/design.md, "Layout"): ``model/`` (what a job and a run are),
``wire/`` (the worker socket's frames), ``host/`` (the queue host's rules and state),
``server/`` (its Jupyter face), ``worker/``, ``client/``, ``notebook/`` and ``cli/``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .client.client import Client, ComputeQueueError, Job
    from .notebook.widget import editor

__all__ = ["Client", "ComputeQueueError", "Job", "__version__", "editor"]


def __getattr__(name: str) -> Any:
    if name in {"Client", "ComputeQueueError", "Job"}:
        from .client import client

        return getattr(client, name)
    if name == "editor":
        from .notebook.widget import editor

        return editor
    raise AttributeError(f"module 'jupyter_compute_queue' has no attribute {name!r}")


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    """The server extension (imported lazily: a kernel importing the package stays light)."""
    from .server.app import ComputeQueueApp

    return [{"module": "jupyter_compute_queue", "app": ComputeQueueApp}]


def load_ipython_extension(shell: Any) -> None:
    """``%load_ext jupyter_compute_queue`` registers the ``%%container`` cell magic."""
    from .notebook.magic import load_ipython_extension as load

    load(shell)
