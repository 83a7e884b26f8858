"""A real IPython kernel for tests, driven over jupyter_client's blocking API.

Cells are sent the way JupyterLab sends them (with ``cellId`` in the request's metadata), and
everything the kernel publishes for a cell is collected, so tests see what a notebook would.
The blocking client is used from threads (``asyncio.to_thread``) so the Jupyter server under
test keeps serving on the test's loop.
"""

from __future__ import annotations

import contextlib
import os
import queue
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client.manager import KernelManager


@dataclass
class CellRun:
    """What a cell did: its reply and what it published."""

    reply: dict[str, Any] = field(default_factory=dict)
    stdout: str = ""
    stderr: str = ""
    results: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.reply.get("status") == "ok"

    @property
    def value(self) -> str:
        """The text/plain of the cell's value."""
        return "".join(r["data"].get("text/plain", "") for r in self.results)


class Kernel:
    """One ipykernel process in ``cwd`` with ``env`` added to this process's environment."""

    def __init__(self, cwd: Path, env: Mapping[str, str] | None = None) -> None:
        self.manager = KernelManager(kernel_name="python3")
        self.manager.start_kernel(cwd=str(cwd), env={**os.environ, **(env or {})})
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    def run(
        self,
        code: str,
        cell_id: str | None = None,
        timeout: float = 120,
        on_output: Callable[[CellRun], None] | None = None,
    ) -> CellRun:
        """Execute ``code`` as the cell ``cell_id`` and collect its outputs until it is idle.
        ``on_output`` sees the run after each output (e.g. to interrupt at a given line)."""
        content = {
            "code": code,
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        }
        metadata = {"cellId": cell_id or str(uuid.uuid4())}
        msg = self.client.session.msg("execute_request", content, metadata=metadata)
        self.client.shell_channel.send(msg)
        msg_id = msg["header"]["msg_id"]
        run = CellRun()
        deadline = time.monotonic() + timeout
        idle = False
        while not idle:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the cell did not finish in {timeout} s: {run}")
            try:
                message = self.client.get_iopub_msg(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            kind, body = message["msg_type"], message["content"]
            if kind == "stream":
                if body["name"] == "stdout":
                    run.stdout += body["text"]
                else:
                    run.stderr += body["text"]
            elif kind in ("execute_result", "display_data"):
                run.results.append(body)
            elif kind == "error":
                run.errors.append(body)
            elif kind == "status" and body["execution_state"] == "idle":
                idle = True
            if on_output is not None and kind in ("stream", "execute_result", "error"):
                on_output(run)
        while True:
            reply = self.client.get_shell_msg(timeout=max(1.0, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg_id:
                run.reply = reply["content"]
                return run

    def interrupt(self) -> None:
        self.manager.interrupt_kernel()

    def close(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


@contextlib.contextmanager
def magic_kernel(cwd: Path) -> Iterator[Kernel]:
    """A kernel in ``cwd`` with the extension loaded, showing the magic's output as plain text
    (no front end shows widgets in these tests)."""
    kernel = Kernel(cwd, env={"COMPUTE_QUEUE_DISPLAY": "text"})
    try:
        ready = kernel.run("%load_ext jupyter_compute_queue")
        assert ready.ok, ready
        yield kernel
    finally:
        kernel.close()
