"""``jupyter compute-queue job …`` and ``queue status|new``: the Python client, from a shell.

Every command is a small function over :class:`~jupyter_compute_queue.client.Client`;
:func:`run` turns what goes wrong into one line on stderr and an exit code (:data:`EXIT_CODES`,
:data:`WAIT_CODES`, also in ``docs/cli.md``). The client is imported lazily, so ``serve`` and
``queue token`` do not pay for it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..client.errors import ComputeQueueError, HostNotFound, JobTimeout
from .format import (
    Interrupted,
    StatusLine,
    download,
    follow,
    note,
    runs_table,
    short,
    status_summary,
)

if TYPE_CHECKING:
    from ..client.client import Client, Job

Handler = Callable[[argparse.Namespace], int]

OK, FAILURE, USAGE, NO_HOST, NOT_FOUND, FORBIDDEN, STILL_RUNNING = 0, 1, 2, 3, 4, 5, 6
#: A finished run's exit code by its reason (Failed gives the container's own code).
REASON_CODES = {
    "Success": 0,
    "Failed": 1,
    "TimedOut": 124,
    "Error": 125,
    "WorkerLost": 125,
    "Cancelled": 130,
    "Replaced": 130,
}
INTERRUPTED = 130

EXIT_CODES = """exit codes:
  0    success
  1    any other failure (a host error such as 409 or 500, a download that failed …)
  2    usage: a bad option, an invalid job definition (the host's message names the field)
  3    no host: none found (--url, $COMPUTE_QUEUE_URL, a Jupyter server), or it cannot be reached
  4    not found (HTTP 404): an unknown job or run, or an output it does not have
  5    forbidden (HTTP 401/403): no token, or a wrong one
"""
WAIT_CODES = """when it waits for the job, how the job ended:
  0    Success
  N    Failed: the container's own exit code N (1 if it has none)
  6    --timeout passed first (the job goes on)
  124  TimedOut: past its max duration (as coreutils timeout)
  125  Error or WorkerLost: the system failed, not the job (as docker run)
  130  Cancelled or Replaced; also Ctrl-C here (the job goes on)
"""
HEX_ID = re.compile(r"[0-9a-f]{64}")


class UsageError(Exception):
    """A mistake in the command line (exit 2)."""


def fail(message: str) -> None:
    text = " ".join(message.splitlines())
    sys.stderr.write(f"jupyter compute-queue: error: {text}\n")
    sys.stderr.flush()


def error_code(exc: ComputeQueueError) -> int:
    """The exit code of a failed request, by its HTTP status."""
    if exc.status is None:  # no answer at all: refused, unknown name, timed out
        return NO_HOST if "cannot reach the host" in exc.message else FAILURE
    if exc.status in (400, 413):
        return USAGE
    if exc.status == 404:
        return NOT_FOUND
    return FORBIDDEN if exc.status in (401, 403) else FAILURE


def run(handler: Handler, args: argparse.Namespace) -> int:
    """Run a command; anything that goes wrong is one line on stderr and an exit code."""
    try:
        return handler(args)
    except UsageError as exc:
        fail(str(exc))
        return USAGE
    except HostNotFound as exc:
        tried = [t.replace("Client(url=…)", "--url") for t in exc.tried]
        fail(
            f"no compute-queue host found (looked at: {'; '.join(tried)}); pass --url and "
            "--token, or set COMPUTE_QUEUE_URL and COMPUTE_QUEUE_TOKEN"
        )
        return NO_HOST
    except JobTimeout as exc:
        fail(f"{exc.message}; it goes on")
        return STILL_RUNNING
    except ComputeQueueError as exc:
        fail(str(exc))
        return error_code(exc)
    except Interrupted as exc:
        note(str(exc))
        return INTERRUPTED
    except KeyboardInterrupt:
        note("interrupted")
        return INTERRUPTED
    except BrokenPipeError:  # `… | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return FAILURE
    except ValueError as exc:  # the client's checks of files and envelopes, a bad --url
        fail(str(exc))
        return USAGE
    except OSError as exc:  # local files: an output folder that cannot be written …
        fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))
        return FAILURE


# --- helpers ---------------------------------------------------------------------------------


def client_for(args: argparse.Namespace) -> Client:
    from ..client.client import Client

    return Client(args.url, args.token, queue=getattr(args, "queue", None) or "local")


def job_id_of(client: Client, text: str, queue: str | None) -> str:
    """A full job id from a full id, or from a prefix of one among the queue's newest runs."""
    ident = text.strip().lower()
    if HEX_ID.fullmatch(ident):
        return ident
    if not re.fullmatch(r"[0-9a-f]{4,63}", ident):
        raise UsageError(f"JOB_ID {text!r}: a job id is 64 hex digits (or 4+ of them with --queue)")
    if not queue:
        raise UsageError(f"JOB_ID {text!r} is short: give the full id, or --queue to look it up")
    found = {r.job_id for r in client.runs(queue, limit=1000) if r.job_id.startswith(ident)}
    if len(found) > 1:
        raise UsageError(f"{ident} starts {len(found)} job ids in queue {queue!r}: give more")
    if not found:
        raise ComputeQueueError(f"no job {ident}… in the newest 1000 runs of {queue!r}", 404)
    return found.pop()


def attach(args: argparse.Namespace) -> Job:
    client = client_for(args)
    job_id = job_id_of(client, args.job_id, args.queue)
    return client.job(job_id, args.queue, run_id=getattr(args, "run", None))


def result_code(job: Job) -> int:
    """The exit code of a finished run (see :data:`WAIT_CODES`)."""
    reason = job.reason or ""
    if reason == "Failed" and job.exit_code is not None and 0 < job.exit_code < 256:
        return job.exit_code
    return REASON_CODES.get(reason, FAILURE)


def report_end(job: Job) -> int:
    """Say how the run ended (on stderr) and return its exit code."""
    code, message = job.exit_code, job.message
    text = f"job {short(job.job_id)} finished: {job.reason}"
    if job.reason == "Failed" and code is not None:
        text += f" (exit code {code})"
    if message and message not in (f"exited with code {code}", (job.reason or "").lower()):
        text += f": {message}"
    note(text)
    return result_code(job)


# --- job add ---------------------------------------------------------------------------------


def read_definition(source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(definition, envelope) from ``-`` (stdin) or a JSON file: a bare definition, or an
    envelope ``{"definition", "namespace", "rerun", "callbacks", "secrets"}``."""
    where = "on stdin" if source == "-" else f"in {source}"
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read the definition {source}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"the definition {where} is not JSON: {exc}") from None
    envelope: dict[str, Any] = {}
    if isinstance(data, dict) and "definition" in data:
        unknown = set(data) - {"definition", "namespace", "rerun", "callbacks", "secrets"}
        if unknown:
            raise UsageError(f"unknown envelope field(s) {where}: {', '.join(sorted(unknown))}")
        envelope, data = data, data["definition"]
    if not isinstance(data, dict):
        raise UsageError(f"the definition {where} is not a JSON object")
    return dict(data), envelope


def build_definition(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The definition of ``job add``: from stdin or a file, with the options on top."""
    definition, envelope = read_definition(args.definition) if args.definition else ({}, {})
    if args.image:
        definition["image"] = args.image
    if args.command is not None:
        definition["command"] = args.command
    if args.env:
        env = dict(definition.get("env") or {})
        for item in args.env:
            key, sep, value = item.partition("=")
            if not sep:
                if key not in os.environ:
                    raise UsageError(f"-e {key}: not set here; give {key}=VALUE")
                value = os.environ[key]
            env[key] = value
        definition["env"] = env
    wanted = {"cpus": args.cpus, "memory": args.memory, "gpus": args.gpus}
    if any(v is not None for v in wanted.values()):
        requirements = dict(definition.get("requirements") or {})
        requirements.update({k: v for k, v in wanted.items() if v is not None})
        if isinstance(args.cpus, float) and args.cpus.is_integer():
            requirements["cpus"] = int(args.cpus)
        definition["requirements"] = requirements
    if args.max_duration is not None:
        definition["maxDuration"] = args.max_duration
    if not definition:
        raise UsageError("nothing to run: give --image and --command, or a definition ('-')")
    return definition, envelope


def secret_values(names: list[str], given: Any = None) -> dict[str, str] | None:
    """``--secret NAME``: the values of this process's environment variables (never a value
    on the command line, where ``ps`` and the shell's history would show it), on top of an
    envelope's ``secrets``."""
    values = dict(given) if isinstance(given, dict) else {}
    for name in names:
        if "=" in name:
            raise UsageError(
                f"--secret {name.partition('=')[0]}=…: give the name only; the "
                "value comes from the environment (export it first)"
            )
        if name not in os.environ:
            raise UsageError(f"--secret {name}: not set here; export {name}=… first")
        values[name] = os.environ[name]
    return values or None


def input_files(values: list[str]) -> dict[str, str]:
    """``-f PATH`` (under its base name) and ``-f DEST=PATH`` as input path → local path."""
    files: dict[str, str] = {}
    for value in values:
        dest, sep, path = value.partition("=")
        if not sep or not dest or Path(value).expanduser().exists():
            dest, path = "", value
        local = Path(path).expanduser()
        if not local.exists():
            raise UsageError(f"-f {value}: no such file or folder")
        name = (dest or local.resolve().name).strip("/")
        if not name:
            raise UsageError(f"-f {value}: name it in /inputs with -f NAME={path}")
        if name in files:
            raise UsageError(f"-f: two inputs named {name!r}; rename one with -f NAME=PATH")
        files[name] = str(local)
    return files


def job_add(args: argparse.Namespace) -> int:
    definition, envelope = build_definition(args)
    files = input_files(args.file)
    client = client_for(args)
    job = client.submit(
        definition,
        args.queue,
        namespace=args.namespace or envelope.get("namespace"),
        rerun=args.rerun or bool(envelope.get("rerun")),
        files=files,
        callbacks=envelope.get("callbacks"),
        secrets=secret_values(args.secret, envelope.get("secrets")),
    )
    wait = args.wait or args.outputs is not None
    if not wait:
        print(job.job_id)
        print(job.url)
    where = f"in queue {job.queue!r}" + (f" ({job.url})" if wait else "")
    record = job.record
    if job.cached and record is not None and record.finished_at is not None:
        when = record.finished_at.strftime("%Y-%m-%d %H:%M:%S UTC")
        note(f"job {short(job.job_id)} {where}: cached result from {when}; --rerun runs it again")
    else:
        note(f"job {short(job.job_id)} is {job.state} {where}")
    if not wait:
        return OK
    follow(job, logs=True, timeout=args.timeout)
    code = report_end(job)
    if args.outputs is not None and job.outputs:
        written = download(job, Path(args.outputs))
        note(f"{len(written)} output file(s) in {args.outputs}")
    return code


# --- the other job commands ------------------------------------------------------------------


def job_get(args: argparse.Namespace) -> int:
    client = client_for(args)
    data = client.job_data(job_id_of(client, args.job_id, args.queue), args.queue)
    print(json.dumps(data, indent=2, ensure_ascii=False))
    return OK


def job_logs(args: argparse.Namespace) -> int:
    job = attach(args)
    if not args.follow:
        sys.stdout.write(job.logs())
        return OK
    with job.stream_logs() as stream:
        for text in stream.text():
            sys.stdout.write(text)
            sys.stdout.flush()
    return OK


def job_cancel(args: argparse.Namespace) -> int:
    client = client_for(args)
    job_id = job_id_of(client, args.job_id, args.queue)
    answer = client.cancel(job_id, args.queue, args.namespace)
    print(f"job {short(job_id)}: {answer.get('message')}")
    return OK


def job_wait(args: argparse.Namespace) -> int:
    job = attach(args)
    follow(job, logs=False, timeout=args.timeout)
    return report_end(job)


def job_outputs(args: argparse.Namespace) -> int:
    job = attach(args)
    if not job.finished:
        raise ComputeQueueError(
            f"job {short(job.job_id)} is {job.state}: outputs come when it has finished "
            f"(jupyter compute-queue job wait {job.job_id})"
        )
    if args.zip:
        target = Path(args.output) if args.output else Path("outputs") / f"{short(job.job_id)}.zip"
        line = StatusLine()
        try:
            print(job.download_zip(target, progress=line.transfer("downloading outputs.zip:")))
        finally:
            line.clear()
        return OK
    if not job.outputs:
        note(f"job {short(job.job_id)} has no outputs")
        return OK
    for path in download(job, Path(args.output or Path("outputs") / short(job.job_id))):
        print(path)
    return OK


def job_list(args: argparse.Namespace) -> int:
    runs = client_for(args).runs(args.queue, args.state or None, args.namespace, args.limit)
    if args.json:
        print(json.dumps([r.wire() for r in runs], indent=2, ensure_ascii=False))
    elif runs:
        print(runs_table(runs))
    else:
        note(f"no runs in queue {args.queue!r}" + (" in that state" if args.state else ""))
    return OK


# --- queue status / new ----------------------------------------------------------------------


def queue_status(args: argparse.Namespace) -> int:
    data = client_for(args).status(args.queue)
    print(json.dumps(data, indent=2) if args.json else status_summary(data))
    return OK


def queue_new(args: argparse.Namespace) -> int:
    """A name with 128 bits of randomness on the first line, and its URL when a host is found
    (discovery reads files only: nothing is asked of the host)."""
    from ..client.discovery import find_host

    name = secrets.token_hex(16)
    print(name)
    host, _ = find_host(args.url, args.token)
    if host is None:
        note("no host found, so no URL: pass --url, or set COMPUTE_QUEUE_URL")
    else:
        print(f"{host.api}q/{name}")
    return OK
