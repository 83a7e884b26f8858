"""The front-end pipeline, end to end: the built extension is installed, JupyterLab loads it, and
the widget bundle renders and syncs in a notebook; its host data source talks to a real host."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import jupyter_compute_queue
from tests.browser.lab import LabServer, Page, expect, open_notebook, run_cell, terminal

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser")]

PACKAGE = Path(jupyter_compute_queue.__file__).parent
WIDGET_JS = PACKAGE / "notebook" / "static" / "widget.js"
SIDEBAR = "jupyter-compute-queue:sidebar"

# A minimal anywidget on the built bundle; it records what the front end sends the kernel.
WIDGET_CELL = """\
import pathlib, anywidget, traitlets, jupyter_compute_queue

class Job(anywidget.AnyWidget):
    _esm = pathlib.Path(jupyter_compute_queue.__file__).parent / "notebook" / "static" / "widget.js"
    job_id = traitlets.Unicode("5891b5b522d5df08").tag(sync=True)
    state = traitlets.Unicode("Queued").tag(sync=True)

    def __init__(self):
        super().__init__()
        self.received = []
        self.on_msg(lambda _, content, buffers: self.received.append(content))

job = Job()
job
"""


def test_labextension_list_shows_it_enabled_and_ok() -> None:
    result = subprocess.run(
        [Path(sys.executable).parent / "jupyter", "labextension", "list"],
        capture_output=True,
        text=True,
        check=True,
    )
    # The listing goes to stderr; strip the colours.
    listing = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout + result.stderr)
    line = next((x for x in listing.splitlines() if "jupyter-compute-queue" in x), None)
    assert line is not None, listing
    assert re.search(r"jupyter-compute-queue v\S+ enabled OK", line), line
    assert "(python, jupyter-compute-queue)" in line, line


def test_the_built_outputs_are_in_place() -> None:
    labextension = PACKAGE / "labextension"
    built = json.loads((labextension / "package.json").read_text())
    assert built["name"] == "jupyter-compute-queue"
    assert (labextension / built["jupyterlab"]["_build"]["load"]).is_file()
    # One ES module with a default export (anywidget's contract), no import of anything else.
    bundle = WIDGET_JS.read_text()
    assert "export" in bundle and not re.search(r"^\s*import\s", bundle, re.MULTILINE)


def test_sidebar_tab_opens_the_panel(lab_page: Page) -> None:
    tab = lab_page.locator(f'.jp-SideBar.jp-mod-left .lm-TabBar-tab[data-id="{SIDEBAR}"]')
    expect(tab).to_have_attribute("title", "Compute queues")
    expect(tab.locator("svg")).to_be_visible()
    tab.click()
    panel = lab_page.locator(f'[id="{SIDEBAR}"]')
    expect(panel).to_be_visible()
    expect(panel.locator(".jcq-sidebar-title")).to_have_text("Compute queues")
    expect(panel.locator('.jcq-queue[data-queue="local"]')).to_be_visible()
    expect(tab).to_have_attribute("aria-selected", "true")


def test_widget_renders_and_syncs_in_a_notebook(lab_page: Page, lab: LabServer) -> None:
    path = lab.create_notebook("widget.ipynb")
    notebook = open_notebook(lab_page, path)

    cell = run_cell(lab_page, notebook, WIDGET_CELL)
    view = cell.locator(".jcq-job")
    expect(view).to_be_visible()
    expect(view.locator(".jcq-job-id")).to_have_text("5891b5b522d5")  # the short id
    expect(view.locator(".jcq-job-id")).to_have_attribute("data-job-id", "5891b5b522d5df08")
    expect(view.locator(".jcq-job-state")).to_have_text("Queued")
    # The bundle's own style sheet came with it (injected, no separate CSS file).
    expect(view).to_have_css("border-left-width", "3px")

    run_cell(lab_page, notebook, 'job.state = "Running"')
    expect(view.locator(".jcq-job-state")).to_have_text("Running")

    # Log deltas through the kernel: an overlapping resend reaches the view once.
    records = [
        {"o": 0, "t": 0, "s": "out", "d": "hello\n"},
        {"o": 6, "t": 0, "s": "out", "d": "wörld\n"},
    ]
    run_cell(
        lab_page,
        notebook,
        f"records = {records!r}\n"
        'job.send({"type": "logs", "offset": 0, "records": records[:1]})\n'
        'job.send({"type": "logs", "offset": 0, "records": records})\n',
    )
    expect(terminal(view)).to_contain_text("hello")
    expect(terminal(view)).to_contain_text("wörld")
    assert terminal(view).inner_text().count("hello") == 1

    # The view asked the kernel to replay the log from the start, and said it was shown.
    replies = run_cell(lab_page, notebook, "print(job.received)").locator(".jp-OutputArea")
    expect(replies).to_contain_text("{'type': 'logs', 'since': 0, 'id': ")
    expect(replies).to_contain_text("{'type': 'rendered', 'id': ")


def test_host_source_follows_a_job_over_rest_and_websocket(lab_page: Page, lab: LabServer) -> None:
    # The bundle loaded the way anywidget loads it (a blob URL), outside any kernel.
    lab_page.evaluate(
        """async code => {
            const url = URL.createObjectURL(new Blob([code], {type: 'text/javascript'}));
            window.jcq = await import(url);
        }""",
        WIDGET_JS.read_text(),
    )
    # No worker serves the queue: the job stays Queued until cancelled.
    result = lab_page.evaluate(
        """async () => {
            const baseUrl = window.jupyterapp.serviceManager.serverSettings.baseUrl;
            const source = new window.jcq.HostJobSource({baseUrl, queue: 'browser-test'});
            window.seen = [];
            source.onChange(snapshot => window.seen.push(snapshot));
            await source.submit({image: 'busybox', command: 'echo hi'});
            const submitted = source.snapshot;
            window.source = source;
            return {submitted, output: source.outputUrl('a b/c.txt'), zip: source.zipUrl()};
        }"""
    )
    submitted = result["submitted"]
    assert re.fullmatch(r"[0-9a-f]{64}", submitted["jobId"])
    assert submitted["state"] == "Queued"
    assert submitted["queue"] == "browser-test"
    job_path = f"{lab.url}compute-queue/q/browser-test/j/{submitted['jobId']}"
    assert result["output"] == f"{job_path}/outputs/a%20b/c.txt"
    assert result["zip"] == f"{job_path}/outputs.zip"

    # Cancel (a cookie-authenticated POST: the _xsrf header) and see it arrive by websocket.
    lab_page.evaluate("() => window.source.cancel()")
    lab_page.wait_for_function(
        "() => window.seen.some(s => s.state === 'Finished' && s.reason === 'Cancelled')"
    )

    # A rerun is a new run of the same job, which the source then follows.
    rerun = lab_page.evaluate(
        """async () => {
            const before = window.source.snapshot.runId;
            await window.source.rerun();
            const after = window.source.snapshot;
            await window.source.cancel();
            window.source.dispose();
            return {before, after};
        }"""
    )
    assert rerun["after"]["jobId"] == submitted["jobId"]
    assert rerun["after"]["runId"] not in (None, rerun["before"])
    assert rerun["after"]["state"] == "Queued"
