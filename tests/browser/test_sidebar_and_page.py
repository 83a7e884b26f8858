"""The JupyterLab sidebar and the shareable job page, in Chromium against a real JupyterLab with
its local worker and Docker (issue #8)."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import uuid
from typing import Any

import pytest

from jupyter_compute_queue.model.jobs import job_id, parse_definition
from tests.browser.conftest import SCREENSHOTS
from tests.browser.lab import LabServer, Page, expect

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser"), pytest.mark.local_worker]

SIDEBAR = "jupyter-compute-queue:sidebar"
BUSYBOX = "cq-test/busybox:1"


def submit(lab: LabServer, command: str, queue: str = "local") -> dict[str, Any]:
    answer: dict[str, Any] = lab.api(
        "POST", f"compute-queue/q/{queue}", {"image": BUSYBOX, "command": command}
    )
    return answer


def wait_finished(lab: LabServer, queue: str, job: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        record: dict[str, Any] = lab.api("GET", f"compute-queue/q/{queue}/j/{job}/result.json")
        if record["state"] == "Finished":
            return record
        assert time.monotonic() < deadline, f"job {job} not finished in {timeout} s: {record}"
        time.sleep(0.2)


def open_sidebar(page: Page) -> Any:
    page.locator(f'.jp-SideBar.jp-mod-left .lm-TabBar-tab[data-id="{SIDEBAR}"]').click()
    panel = page.locator(f'[id="{SIDEBAR}"]')
    expect(panel).to_be_visible()
    return panel


def worker_running_when(page: Page, run_id: str, state: str) -> list[str]:
    """The local worker's running runs in the first DOM state (checked at every animation frame)
    where the sidebar shows ``run_id`` in ``state``: one render draws both from one message."""
    handle = page.wait_for_function(
        """([runId, state]) => {
            const queue = document.querySelector('.jcq-queue[data-queue="local"]');
            const run = queue?.querySelector(`.jcq-run[data-run-id="${runId}"]`);
            const worker = queue?.querySelector('.jcq-worker');
            if (!run || !worker || run.getAttribute('data-state') !== state) return null;
            return (worker.getAttribute('data-running') || '').split(' ').filter(Boolean);
        }""",
        arg=[run_id, state],
        polling="raf",
        timeout=30_000,
    )
    running: list[str] = handle.json_value()
    return running


def shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def test_a_job_from_the_api_appears_and_its_logs_open(
    lab_page: Page, lab: LabServer, test_images: Any
) -> None:
    marker = uuid.uuid4().hex[:8]
    answer = submit(lab, f"echo sidebar-{marker}; echo result > /outputs/r.txt")
    panel = open_sidebar(lab_page)
    queue = panel.locator('.jcq-queue[data-queue="local"]')
    run = queue.locator(f'.jcq-run[data-run-id="{answer["runId"]}"]')
    expect(run).to_be_visible(timeout=30_000)
    expect(run).to_have_attribute("data-state", "Success", timeout=60_000)
    expect(queue.locator(".jcq-worker")).to_have_count(1)  # the local worker, with its details
    run.locator(".jcq-run-open").click()
    opened = lab_page.locator(".jcq-run-panel")
    expect(opened.locator(".jcq-terminal")).to_contain_text(f"sidebar-{marker}", timeout=30_000)
    expect(opened.locator(".jcq-output-path")).to_contain_text("r.txt")
    shot(lab_page, "sidebar-run-opened")


def test_cancel_from_the_sidebar(lab_page: Page, lab: LabServer, test_images: Any) -> None:
    answer = submit(lab, f"echo started-{uuid.uuid4().hex[:6]}; sleep 120")
    panel = open_sidebar(lab_page)
    run = panel.locator(f'.jcq-run[data-run-id="{answer["runId"]}"]')
    expect(run).to_have_attribute("data-state", "Running", timeout=60_000)
    # The worker's running runs follow the run's events (the host sends a worker event only on
    # connect), so the frame that first shows the run in a state also shows the worker with it.
    assert answer["runId"] in worker_running_when(lab_page, answer["runId"], "Running")
    run.locator(".jcq-run-cancel").click()
    expect(run).to_have_attribute("data-state", "Cancelled", timeout=30_000)
    assert answer["runId"] not in worker_running_when(lab_page, answer["runId"], "Cancelled")
    record = wait_finished(lab, "local", answer["jobId"])
    assert record["reason"] == "Cancelled"
    shot(lab_page, "sidebar-cancelled")


def test_a_queue_without_workers_shows_the_worker_command(lab_page: Page) -> None:
    panel = open_sidebar(lab_page)
    name = f"gpu-{uuid.uuid4().hex[:6]}"
    panel.locator(".jcq-add-queue-name").fill(name)
    panel.locator(".jcq-add-queue-button").click()
    queue = panel.locator(f'.jcq-queue[data-queue="{name}"]')
    command = queue.locator(".jcq-worker-command")
    expect(command).to_contain_text(f"jupyter compute-queue worker {name} --url http")
    expect(command).to_contain_text(f"--token {name}:")
    panel.locator(".jcq-add-queue-name").fill("not a name")
    panel.locator(".jcq-add-queue-button").click()
    expect(panel.locator(".jcq-add-queue-error")).to_contain_text("is not a queue name")
    shot(lab_page, "sidebar-empty-queue")


def test_the_page_of_a_job_url_shows_its_logs_and_outputs(
    lab_page: Page, lab: LabServer, test_images: Any
) -> None:
    marker = uuid.uuid4().hex[:8]
    answer = submit(lab, f"echo page-{marker}; echo data > /outputs/table.csv")
    wait_finished(lab, "local", answer["jobId"])
    # The same browser session (the login cookie of the lab page) opens the shared link.
    lab_page.goto(f"{lab.url}compute-queue/ui/#?queue=local&job={answer['jobId']}")
    view = lab_page.locator("#jcq-page .jcq-job")
    expect(view.locator(".jcq-job-state")).to_contain_text("Success", timeout=30_000)
    expect(view.locator(".jcq-terminal")).to_contain_text(f"page-{marker}", timeout=30_000)
    expect(view.locator(".jcq-output-path")).to_contain_text("table.csv")
    shot(lab_page, "job-page")


def test_autostart_on_local_shows_a_run_button_instead(lab_page: Page, lab: LabServer) -> None:
    definition = {"image": BUSYBOX, "command": f"echo never-{uuid.uuid4().hex[:8]}"}
    encoded = base64.urlsafe_b64encode(json.dumps(definition).encode()).decode().rstrip("=")
    lab_page.goto(f"{lab.url}compute-queue/ui/#?queue=local&job={encoded}&autostart=1&X=1")
    expect(lab_page.locator(".jcq-page-run")).to_be_visible()
    expect(lab_page.locator(".jcq-page-note")).to_contain_text("private")
    expect(lab_page.locator(".jcq-page-definition")).to_contain_text('"X": "1"')
    shot(lab_page, "job-page-run-button")
    # Nothing was submitted: the job (with the extra parameter in its env) is unknown.
    expected = job_id(parse_definition({**definition, "env": {"X": "1"}}))
    with pytest.raises(urllib.error.HTTPError) as refused:
        lab.api("GET", f"compute-queue/q/local/j/{expected}")
    assert refused.value.code == 404
