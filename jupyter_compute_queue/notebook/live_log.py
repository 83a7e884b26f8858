"""A job's live log read in a background thread into a queue: the kernel's main thread (the
plain-text follow) or the widget's pump takes it from there, and stays free meanwhile."""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..client.client import Job


def read_log_into(job: Job, into: queue.Queue[Any], stop: threading.Event) -> None:
    """Move the live log into ``into``; None marks its end, an exception a failure."""
    try:
        with job.stream_logs() as stream:
            for record in stream:
                if stop.is_set():
                    return
                into.put(record)
        into.put(None)
    except BaseException as exc:  # handed to the main thread, which raises it
        into.put(exc)
