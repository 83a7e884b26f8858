"""The tutorial notebooks, executed with nbclient against a real host with its local worker.

The kernel finds the host through ``COMPUTE_QUEUE_URL``; the notebooks use the magic's default
image, which ``COMPUTE_QUEUE_IMAGE`` points at the suite's Python image (no registry here).
Each notebook runs from a copy in ``tmp_path``, as a user would run it from their folder.
"""

from __future__ import annotations

import shutil
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from tests.worker.test_local_worker import cleanup  # noqa: F401 - the local worker is stopped and cleaned

from .conftest import Fetch

NOTEBOOKS = Path(__file__).parents[2] / "notebooks"

pytestmark = pytest.mark.parametrize("cq_config", [{"local_worker": True}])


Execute = Callable[[str], Awaitable[nbformat.NotebookNode]]


@pytest.fixture
def execute(
    cleanup: None,  # noqa: F811
    jp_serverapp: Any,
    test_images: Any,
    fetch: Fetch,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    jp_http_port: int,
    jp_base_url: str,
    host_token: str,
) -> Execute:
    """Runs a notebook of notebooks/ from a copy in ``tmp_path`` against this test's host."""

    async def run(name: str) -> nbformat.NotebookNode:
        return await _execute(
            jp_serverapp, name, tmp_path, monkeypatch, jp_http_port, jp_base_url, host_token
        )

    return run


async def _execute(
    serverapp: Any,
    name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    jp_http_port: int,
    jp_base_url: str,
    host_token: str,
) -> nbformat.NotebookNode:
    app = serverapp.web_app.settings["compute_queue"]
    shutil.copy(NOTEBOOKS / name, tmp_path / name)
    # pytest-jupyter does not call the extension's start hook: start the worker as it does.
    await app.start_local_worker(serverapp)
    monkeypatch.setenv("COMPUTE_QUEUE_URL", f"http://127.0.0.1:{jp_http_port}{jp_base_url}")
    monkeypatch.setenv("COMPUTE_QUEUE_TOKEN", host_token)
    monkeypatch.setenv("COMPUTE_QUEUE_IMAGE", "cq-test/python:1")
    monkeypatch.setenv("COMPUTE_QUEUE_DISPLAY", "text")  # nbclient shows no widgets
    monkeypatch.setenv("JPY_SESSION_NAME", str(tmp_path / name))
    notebook = nbformat.read(tmp_path / name, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=180,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    try:
        await client.async_execute()
    finally:
        for cell in code_cells(notebook):  # shown by pytest when the test fails
            print(f"--- {cell.source[:60]!r}\n{text_of(cell)}")
    return notebook


def text_of(cell: Any) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream":
            parts.append(output["text"])
        elif output["output_type"] in ("execute_result", "display_data"):
            parts.append(output["data"].get("text/plain", ""))
    return "".join(parts)


def code_cells(notebook: nbformat.NotebookNode) -> list[Any]:
    return [c for c in notebook.cells if c.cell_type == "code"]


def cell_with(cells: list[Any], source: str) -> Any:
    return next(c for c in cells if source in c.source)


async def test_the_quickstart_runs(execute: Execute, tmp_path: Path) -> None:
    notebook = await execute("quickstart.ipynb")
    cells = code_cells(notebook)
    assert "hello from " in text_of(cell_with(cells, 'echo "hello from'))
    assert "Python 3." in text_of(cell_with(cells, "import platform"))
    assert "the sum is 5050" in text_of(cell_with(cells, "the sum is"))
    assert "sum.txt holds 5050" in text_of(cell_with(cells, "sum.txt holds"))
    assert (tmp_path / "outputs").is_dir()
    resources = text_of(cell_with(cells, "--cpus 1 --memory 256m"))
    assert "CPU quota: 100000 100000" in resources and str(256 * 1024 * 1024) in resources
    first, second = [c for c in cells if "computed at" in c.source]
    assert "cached result from" not in text_of(first)
    assert "cached result from" in text_of(second)
    assert text_of(first).split("computed at")[1] == text_of(second).split("computed at")[1]
    assert "Cancelled" in text_of(cell_with(cells, "slow.cancel()"))
    assert "Failed 3" in text_of(cell_with(cells, "print(failed.reason"))
    assert "Success from the client" in text_of(cell_with(cells, "from jupyter_compute_queue"))


async def test_the_data_example_makes_a_plot(execute: Execute, tmp_path: Path) -> None:
    notebook = await execute("data-example.ipynb")
    cells = code_cells(notebook)
    job_cell = text_of(cell_with(cells, "%%container"))
    assert "read 365 rows" in job_cell
    [folder] = (tmp_path / "outputs").iterdir()
    monthly = (folder / "monthly.csv").read_text().splitlines()
    assert monthly[0] == "month,mean" and len(monthly) == 13
    means = [float(line.split(",")[1]) for line in monthly[1:]]
    assert max(means) - min(means) > 10  # a seasonal curve, summarised
    png = (folder / "plot.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert struct.unpack(">II", png[16:24]) == (640, 320)
    shown = [
        o for o in cell_with(cells, "display(Image").outputs if "image/png" in o.get("data", {})
    ]
    assert shown, "the plot is shown in the notebook"
