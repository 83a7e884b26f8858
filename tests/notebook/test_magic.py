"""``%%container`` through a real IPython kernel, a real host, an in-process worker and Docker.

One kernel for the module (starting one costs about a second); each test points it at its own
host and working folder first.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jupyter_compute_queue.notebook.magic import PARSER

from ..kernel import CellRun, Kernel, magic_kernel
from .conftest import Fetch, StartWorker, body, unique_id

BUSYBOX = "-q q -i cq-test/busybox:1"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kernel]:
    # Plain text: no front end shows widgets here (test_the_widget_falls_back_to_text checks
    # the default, which waits for one first).
    with magic_kernel(tmp_path_factory.mktemp("kernel")) as k:
        yield k


@pytest.fixture
async def magic(
    kernel: Kernel,
    fetch: Fetch,
    jp_http_port: int,
    jp_base_url: str,
    host_token: str,
    tmp_path: Path,
    start_worker: StartWorker,
) -> Kernel:
    """The module's kernel, pointed at this test's host (with a worker on ``q``), in
    ``tmp_path``."""
    await start_worker(unique_id("magic"), queues=("q",))
    url = f"http://127.0.0.1:{jp_http_port}{jp_base_url}"
    setup = (
        "import os\n"
        f"os.environ.update(COMPUTE_QUEUE_URL={url!r}, COMPUTE_QUEUE_TOKEN={host_token!r})\n"
        f"os.chdir({str(tmp_path)!r})"
    )
    done = await cell(kernel, setup)
    assert done.ok, done
    return kernel


async def cell(kernel: Kernel, code: str, cell_id: str | None = None, **kw: Any) -> CellRun:
    return await asyncio.to_thread(kernel.run, code, cell_id, **kw)


async def runs_of(fetch: Fetch, job_id: str) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = body(await fetch("q", "q", "j", job_id))["runs"]
    return runs


async def job_of(kernel: Kernel, name: str = "_") -> dict[str, Any]:
    """The job id, run id and state of the Job in the kernel variable ``name``."""
    code = f"import json; print(json.dumps(dict(job={name}.job_id, run={name}.run_id)))"
    run = await cell(kernel, code)
    assert run.ok, run
    ids: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    return ids


async def test_a_cell_runs_in_a_container_and_its_outputs_come_back(
    magic: Kernel, tmp_path: Path, fetch: Fetch
) -> None:
    code = (
        f"%%container {BUSYBOX} -e GREETING=hello\n"
        "echo $GREETING from $(pwd)\n"
        "echo to-stderr >&2\n"
        "echo result > /outputs/answer.txt\n"
    )
    run = await cell(magic, code)
    assert run.ok, run
    assert "hello from /inputs" in run.stdout
    assert "to-stderr" in run.stderr
    assert "Finished Success" in run.value  # the cell's value is the Job
    ids = await job_of(magic)
    short = ids["job"][:12]
    assert (tmp_path / "outputs" / short / "answer.txt").read_text() == "result\n"
    assert "1 output file(s)" in run.stdout
    [record] = await runs_of(fetch, ids["job"])
    assert record["namespaces"] and record["namespaces"][0].startswith("cell:")


async def test_an_unchanged_cell_is_a_cache_hit_and_a_changed_one_replaces(
    magic: Kernel, fetch: Fetch
) -> None:
    cell_id = str(uuid.uuid4())
    first = await cell(magic, f"%%container {BUSYBOX} --out first\necho once", cell_id)
    assert first.ok and "once" in first.stdout
    again = await cell(magic, f"%%container {BUSYBOX} --out again\necho once", cell_id)
    assert again.ok, again
    assert "cached result from" in again.stdout
    assert "once" in again.stdout  # the stored log is shown again
    a, b = await job_of(magic, "first"), await job_of(magic, "again")
    assert a == b
    assert len(await runs_of(fetch, a["job"])) == 1

    # A changed cell releases the previous run of the same cell: start a long one, change it.
    slow = await cell(magic, f"%%container {BUSYBOX} --no-wait --out slow\nsleep 60", cell_id)
    assert slow.ok, slow
    s = await job_of(magic, "slow")
    changed = await cell(magic, f"%%container {BUSYBOX}\necho changed", cell_id)
    assert changed.ok and "changed" in changed.stdout
    [old] = await runs_of(fetch, s["job"])
    assert old["state"] == "Finished" and old["reason"] == "Replaced"


async def test_a_failing_job_raises_after_its_log(magic: Kernel) -> None:
    run = await cell(magic, f"%%container {BUSYBOX}\necho before failing\nexit 3")
    assert not run.ok
    assert "before failing" in run.stdout
    [error] = run.errors
    assert error["ename"] == "ContainerJobFailed"
    assert "exit code 3" in error["evalue"]
    assert any("full log:" in line for line in error["traceback"])  # no internals shown

    kept = await cell(magic, f"%%container {BUSYBOX} --no-raise\nexit 4")
    assert kept.ok and "Failed" in kept.value


async def test_an_interrupt_cancels_the_job(magic: Kernel, fetch: Fetch) -> None:
    interrupted = False

    def on_output(run: CellRun) -> None:
        nonlocal interrupted
        if not interrupted and "started" in run.stdout:
            interrupted = True
            magic.interrupt()

    code = f"%%container {BUSYBOX} --out long\necho started\nsleep 120"
    run = await cell(magic, code, on_output=on_output)
    assert interrupted, run
    assert not run.ok and run.errors[0]["ename"] == "KeyboardInterrupt"
    assert "interrupted" in run.stdout
    ids = await job_of(magic, "long")
    [record] = await runs_of(fetch, ids["job"])
    assert record["reason"] == "Cancelled"


async def test_python_with_files(magic: Kernel, tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("x\n1\n2\n3\n")
    (tmp_path / "big.bin").write_bytes(b"\x01" * 200_000)  # over 64 KiB: sent as a blob
    code = (
        "%%container -q q -i cq-test/python:1 --run python3 -f data.csv -f blob=big.bin\n"
        "import csv, os\n"
        "rows = list(csv.DictReader(open('data.csv')))\n"
        "print('sum', sum(int(r['x']) for r in rows), os.path.getsize('blob'))\n"
    )
    run = await cell(magic, code)
    assert run.ok, run
    assert "sum 6 200000" in run.stdout


async def test_usage_errors_are_one_line(magic: Kernel) -> None:
    bad = await cell(magic, f"%%container {BUSYBOX} --cpus many\necho")
    assert not bad.ok and bad.errors[0]["ename"] == "UsageError"
    assert "--cpus" in bad.errors[0]["evalue"]
    missing = await cell(magic, f"%%container {BUSYBOX} -f nowhere.csv\necho")
    assert not missing.ok and "nowhere.csv" in missing.errors[0]["evalue"]


async def test_the_help_documents_every_option(magic: Kernel) -> None:
    run = await cell(magic, "%%container?\n")
    assert run.ok, run
    pages = json.dumps(run.reply.get("payload"))
    for action in PARSER._actions:
        for option in action.option_strings:
            assert option in pages, option


async def test_without_a_widget_front_end_it_falls_back_to_text(magic: Kernel) -> None:
    setup = await cell(magic, "os.environ['COMPUTE_QUEUE_DISPLAY'] = 'auto'")
    assert setup.ok, setup
    try:
        run = await cell(magic, f"%%container {BUSYBOX}\necho shown as text")
    finally:
        await cell(magic, "os.environ['COMPUTE_QUEUE_DISPLAY'] = 'text'")
    assert run.ok, run
    assert "shown as text" in run.stdout  # nobody said the widget was shown: the log is text
    widget = [r for r in run.results if "application/vnd.jupyter.widget-view+json" in r["data"]]
    assert widget, run.results  # the widget was offered all the same
    assert widget[0]["data"]["text/plain"].startswith("<job ")  # what nbconvert would keep
