"""The old path of the job widget, kept as an alias: ``jupyter_compute_queue.widget.editor()``
as the README of 0.1 wrote it. The widget lives in :mod:`.notebook.widget`; new code writes
``jupyter_compute_queue.editor()`` or ``from jupyter_compute_queue.notebook.widget import
JobWidget``."""

from .notebook.widget import JobWidget, editor

__all__ = ["JobWidget", "editor"]
