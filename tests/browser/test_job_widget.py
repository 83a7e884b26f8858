"""The job widget in JupyterLab (issue #7): the ``%%container`` magic shows it; its terminal
streams the log live; Cancel works while the cell blocks; outputs are previewed (images, CSV)
or only offered as downloads (HTML); the editor submits a job. A real JupyterLab with its local
worker and Docker, driven in Chromium."""

from __future__ import annotations

import io
import re
import uuid
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import SCREENSHOTS
from tests.browser.lab import (
    LabServer,
    Locator,
    Page,
    expect,
    open_notebook,
    run_cell,
    terminal,
    wait_for_cell,
)

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser"), pytest.mark.local_worker]

BUSYBOX = "cq-test/busybox:1"
PYTHON = "cq-test/python:1"
LONG = 60_000

# A 40x30 RGB PNG, written by hand (no imaging library in the test image), and a small CSV.
PNG_AND_CSV_CELL = f"""%%container -i {PYTHON} --run python3
import struct, zlib

def chunk(kind, data):
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

width, height = 40, 30
rows = b"".join(
    b"\\x00" + b"".join(bytes([x * 6, y * 8, 160]) for x in range(width)) for y in range(height)
)
png = (
    b"\\x89PNG\\r\\n\\x1a\\n"
    + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    + chunk(b"IDAT", zlib.compress(rows))
    + chunk(b"IEND", b"")
)
open("/outputs/gradient.png", "wb").write(png)
with open("/outputs/table.csv", "w") as f:
    f.write("name,value\\n")
    for i in range(80):
        f.write(f"row {{i}},{{i * i}}\\n")
print("wrote", len(png), "bytes of PNG")
"""

HTML = (
    '<html><body><h1 id="from-the-job">hi</h1>'
    "<script>window.jobScriptRan = 1</script></body></html>"
)


NOTE = b"a note from the browser\n"


def shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def notebook(page: Page, lab: LabServer, name: str) -> Locator:
    """A fresh notebook, open, with the magic loaded."""
    panel = open_notebook(page, lab.create_notebook(f"{name}-{uuid.uuid4().hex[:6]}.ipynb"))
    run_cell(page, panel, "%load_ext jupyter_compute_queue")
    return panel


def job_view(cell: Locator) -> Locator:
    view = cell.locator(".jcq-job")
    expect(view).to_be_visible(timeout=30_000)
    return view


def wait_state(view: Locator, state: str, timeout: float = LONG) -> None:
    """Waits for the view to show ``state``; on a timeout, says what the view shows."""
    try:
        expect(view.locator(".jcq-job-state")).to_have_text(state, timeout=timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- the job view shows:\n{view.inner_text()}") from None


def runs_of(lab: LabServer, view: Locator) -> list[dict[str, Any]]:
    job = view.locator(".jcq-job-id").get_attribute("data-job-id")
    assert job and re.fullmatch(r"[0-9a-f]{64}", job), job
    runs: list[dict[str, Any]] = lab.api("GET", f"compute-queue/q/local/j/{job}")["runs"]
    return runs


def test_the_terminal_shows_the_log_live(lab_page: Page, lab: LabServer, test_images: Any) -> None:
    panel = notebook(lab_page, lab, "live")
    marker = uuid.uuid4().hex[:6]  # a new job each time: never a cached result
    cell = run_cell(
        lab_page,
        panel,
        f"%%container -i {BUSYBOX}\n"
        f"echo start {marker}\n"
        "for i in 1 2 3 4 5 6 7 8; do echo line $i; sleep 1; done\n"
        "echo oops >&2",
        wait=False,
    )
    view = job_view(cell)
    rows = terminal(view)
    expect(rows).to_contain_text("line 1", timeout=LONG)
    # Live: the first line is there while the job still runs (it takes 8 s).
    expect(view.locator(".jcq-job-state")).to_have_text("Running")
    assert "line 8" not in rows.inner_text()
    expect(view.locator(".jcq-job-cancel")).to_be_enabled()
    shot(lab_page, "job-widget-live-running")

    wait_state(view, "Success")
    expect(rows).to_contain_text("line 8")
    expect(rows).to_contain_text("oops")
    text = rows.inner_text()
    assert text.count("line 3") == 1, text  # every line once: replay and live did not overlap
    assert re.search(r"\d+:\d\d", view.locator(".jcq-job-elapsed").inner_text())
    expect(view.locator(".jcq-job-rerun")).to_be_enabled()
    expect(view.locator(".jcq-job-id")).to_have_attribute(
        "href", re.compile(r"/cq-lab/compute-queue/ui/#\?queue=local&job=[0-9a-f]{64}$")
    )
    # stderr is tinted: xterm gives the "oops" row a foreground colour class.
    oops = rows.locator("span", has_text="oops")
    expect(oops.first).to_have_class(re.compile(r"xterm-fg-\d"))
    wait_for_cell(cell)
    # The magic showed the widget, not the plain-text log.
    assert "line 1" not in "".join(cell.locator(".jp-OutputArea-output pre").all_inner_texts())


def test_cancel_stops_a_running_job_while_the_cell_blocks(
    lab_page: Page, lab: LabServer, test_images: Any
) -> None:
    panel = notebook(lab_page, lab, "cancel")
    marker = uuid.uuid4().hex[:6]
    cell = run_cell(
        lab_page, panel, f"%%container -i {BUSYBOX}\necho started {marker}; sleep 300", wait=False
    )
    view = job_view(cell)
    expect(terminal(view)).to_contain_text(f"started {marker}", timeout=LONG)
    expect(view.locator(".jcq-job-state")).to_have_text("Running")
    expect(cell.locator(".jp-InputPrompt")).to_have_text(re.compile(r"\[\*\]"))  # it blocks

    view.locator(".jcq-job-cancel").click()
    # JupyterLab ≥ 4.4 sends comms on a kernel subshell (ipykernel 7): the kernel gets the
    # Cancel while the cell blocks, so the busy-kernel notice never has to stay.
    expect(view.locator(".jcq-job-state")).to_have_text("Cancelled", timeout=30_000)
    expect(view.locator(".jcq-job-notice")).to_be_hidden()
    wait_for_cell(cell, timeout=30_000)
    expect(cell.locator(".jp-OutputArea")).to_contain_text("ContainerJobFailed")
    expect(cell.locator(".jp-OutputArea")).to_contain_text("Cancelled")
    shot(lab_page, "job-widget-cancelled")
    runs = runs_of(lab, view)
    assert runs[0]["state"] == "Finished" and runs[0]["reason"] == "Cancelled", runs[0]


def test_an_output_png_is_previewed_and_a_csv_as_a_table(
    lab_page: Page, lab: LabServer, test_images: Any
) -> None:
    panel = notebook(lab_page, lab, "png")
    cell = run_cell(lab_page, panel, PNG_AND_CSV_CELL + f"# {uuid.uuid4().hex}\n", wait=False)
    view = job_view(cell)
    wait_state(view, "Success")
    expect(view.locator(".jcq-outputs-summary")).to_contain_text("2 files")

    png = view.locator('.jcq-output[data-path="gradient.png"]')
    image = png.locator("img.jcq-output-image")
    expect(image).to_be_visible(timeout=30_000)
    image.evaluate(
        """img => img.complete && img.naturalWidth > 0 ? true :
            new Promise((ok, fail) => { img.onload = () => ok(true); img.onerror = fail; })"""
    )
    assert image.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [40, 30]
    assert image.get_attribute("src", timeout=5_000).startswith("blob:")  # type: ignore[union-attr]

    table = view.locator('.jcq-output[data-path="table.csv"] table.jcq-output-table')
    expect(table).to_be_visible()
    expect(table.locator("th")).to_have_text(["name", "value"])
    expect(table.locator("tbody tr")).to_have_count(50)  # the first 50 rows of 80
    expect(table.locator("tbody tr").nth(7).locator("td")).to_have_text(["row 7", "49"])
    expect(view.locator('.jcq-output[data-path="table.csv"]')).to_contain_text("the first 50 rows")
    png.scroll_into_view_if_needed()
    shot(lab_page, "job-widget-previews")
    wait_for_cell(cell)


def test_an_output_html_is_only_a_download(
    lab_page: Page, lab: LabServer, test_images: Any, tmp_path: Path
) -> None:
    panel = notebook(lab_page, lab, "html")
    cell = run_cell(
        lab_page,
        panel,
        f"%%container -i {BUSYBOX}\n"
        f"printf '%s' '{HTML}' > /outputs/page.html\n"
        f"echo {uuid.uuid4().hex}",
        wait=False,
    )
    view = job_view(cell)
    wait_state(view, "Success")
    item = view.locator('.jcq-output[data-path="page.html"]')
    expect(item).to_be_visible()
    expect(item).to_contain_text("no preview")

    # Never rendered: no preview, no frame, nothing of it in the page, its script never ran.
    expect(item.locator(".jcq-output-preview")).to_have_count(0)
    expect(lab_page.locator("#from-the-job")).to_have_count(0)
    expect(view.locator("iframe, object, embed")).to_have_count(0)
    assert lab_page.evaluate("() => window.jobScriptRan") is None

    # Offered as a download, read through the kernel: the bytes are the job's.
    link = item.locator(".jcq-output-download")
    expect(link).to_have_attribute("download", "page.html")
    with lab_page.expect_download() as info:
        link.click()
    download = info.value
    assert download.suggested_filename == "page.html"
    target = tmp_path / "page.html"
    download.save_as(target)
    assert target.read_text() == HTML

    # All outputs as one zip, the same way.
    with lab_page.expect_download() as info:
        view.locator(".jcq-outputs-zip").click()
    archive = tmp_path / "outputs.zip"
    info.value.save_as(archive)
    with zipfile.ZipFile(io.BytesIO(archive.read_bytes())) as z:
        assert z.read("page.html").decode() == HTML
    expect(lab_page.locator("#from-the-job")).to_have_count(0)
    shot(lab_page, "job-widget-html-download")
    wait_for_cell(cell)


def test_the_editor_submits_a_job_that_runs(
    lab_page: Page, lab: LabServer, test_images: Any
) -> None:
    panel = open_notebook(lab_page, lab.create_notebook(f"editor-{uuid.uuid4().hex[:6]}.ipynb"))
    cell = run_cell(
        lab_page, panel, "from jupyter_compute_queue.widget import editor\neditor(queue='local')"
    )
    form = cell.locator("form.jcq-editor")
    expect(form).to_be_visible(timeout=30_000)
    expect(form.locator('input[name="queue"]')).to_have_value("local")
    marker = uuid.uuid4().hex[:8]
    form.locator('input[name="image"]').fill(BUSYBOX)
    form.locator('textarea[name="command"]').fill(
        f'echo "editor says $GREETING {marker}"; cat /inputs/note.txt'
    )
    form.locator('textarea[name="env"]').fill("GREETING=hello there")
    form.locator('input[name="files"]').set_input_files(
        files=[{"name": "note.txt", "mimeType": "text/plain", "buffer": NOTE}]
    )

    # A value the host refuses: its message names the field, and the editor stays.
    form.locator('input[name="memory"]').fill("lots")
    form.locator(".jcq-editor-submit").click()
    expect(form.locator(".jcq-editor-error")).to_contain_text("memory", timeout=30_000)
    shot(lab_page, "job-widget-editor-refused")

    form.locator('input[name="memory"]').fill("64m")
    form.locator(".jcq-editor-submit").click()
    view = cell.locator(".jcq-job")
    expect(form).to_be_hidden(timeout=30_000)
    rows = terminal(view)
    expect(rows).to_contain_text(f"editor says hello there {marker}", timeout=LONG)
    expect(rows).to_contain_text("a note from the browser")
    wait_state(view, "Success")
    shot(lab_page, "job-widget-editor-submitted")
    first = runs_of(lab, view)[0]
    assert first["reason"] == "Success"

    # Rerun: a new run of the same job, its log in a cleared terminal.
    view.locator(".jcq-job-rerun").click()
    expect(view).not_to_have_attribute("data-run-id", first["runId"], timeout=30_000)
    wait_state(view, "Success")
    expect(rows).to_contain_text("a note from the browser")
    assert rows.inner_text().count(f"editor says hello there {marker}") == 1
    runs = runs_of(lab, view)
    assert len(runs) == 2 and view.get_attribute("data-run-id") == runs[0]["runId"]

    # Edit: the editor starts from the job (unchanged fields keep their values, the uploaded
    # input is kept), and submits a new job.
    view.locator(".jcq-job-edit").click()
    form = cell.locator("form.jcq-editor")
    expect(form.locator('input[name="image"]')).to_have_value(BUSYBOX)
    expect(form.locator('textarea[name="env"]')).to_have_value("GREETING=hello there")
    expect(form.locator('input[name="memory"]')).to_have_value("64m")
    expect(form.locator(".jcq-editor-input-name")).to_have_text(["note.txt"])
    form.locator('textarea[name="command"]').fill("echo edited $GREETING; cat /inputs/note.txt")
    form.locator(".jcq-editor-submit").click()
    expect(form).to_be_hidden(timeout=30_000)
    expect(rows).to_contain_text("edited hello there", timeout=LONG)
    expect(rows).to_contain_text("a note from the browser")
    wait_state(view, "Success")
    assert view.locator(".jcq-job-id").get_attribute("data-job-id") != first["jobId"]


def test_without_subshells_cancel_says_to_interrupt_the_busy_kernel(
    lab_page: Page, lab: LabServer, test_images: Any
) -> None:
    # A front end that sends comms on the main shell (JupyterLab < 4.4, or this setting): the
    # kernel reads nothing while the cell blocks, so Cancel gets no ack and the view says why.
    lab_page.evaluate(
        "() => { window.jupyterapp.serviceManager.kernels.commsOverSubshells = 'disabled'; }"
    )
    panel = notebook(lab_page, lab, "busy")
    mode = lab_page.evaluate(
        "() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel"
        ".commsOverSubshells"
    )
    assert mode == "disabled"
    marker = uuid.uuid4().hex[:6]
    cell = run_cell(
        lab_page, panel, f"%%container -i {BUSYBOX}\necho busy {marker}; sleep 300", wait=False
    )
    view = job_view(cell)
    expect(view.locator(".jcq-job-state")).to_have_text("Running", timeout=LONG)
    expect(terminal(view)).to_contain_text(f"busy {marker}")  # kernel → front end still flows

    view.locator(".jcq-job-cancel").click()
    notice = view.locator(".jcq-job-notice")
    expect(notice).to_have_text(
        "The kernel is busy with this cell and cannot receive Cancel: interrupt the kernel (■) "
        "to cancel the job."
    )
    expect(view.locator(".jcq-job-state")).to_have_text("Running")
    shot(lab_page, "job-widget-busy-kernel")

    # Interrupting the kernel cancels the job (the magic's own rule); then the kernel reads the
    # waiting messages, acknowledges them, and the notice goes.
    lab_page.evaluate("() => window.jupyterapp.commands.execute('notebook:interrupt-kernel')")
    expect(view.locator(".jcq-job-state")).to_have_text("Cancelled", timeout=30_000)
    wait_for_cell(cell, timeout=30_000)
    expect(cell.locator(".jp-OutputArea")).to_contain_text("interrupted")
    expect(notice).to_be_hidden(timeout=30_000)
    assert runs_of(lab, view)[0]["reason"] == "Cancelled"
