"""``jupyter compute-queue …``: serve a queue host, run a worker, send jobs, manage queues.

This module holds the parser and hands each subcommand to a small function over the
package's API: ``serve`` and ``queue token`` here, ``worker`` in :mod:`.worker.main`, the job
commands and ``queue status|new`` in :mod:`.cli_jobs` (see ``docs/cli.md``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..host.access import check_queue_name, worker_credential
from . import jobs as jobs


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jupyter compute-queue",
        description="Public compute queues for notebooks: host queues, run workers, send jobs.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run a queue host: a Jupyter server with only this extension",
        description="Run a Jupyter server that hosts compute queues and nothing else (no "
        "terminals, no notebook files). Any --ComputeQueueApp.x=y or --ServerApp.x=y "
        "option is passed on.",
    )
    serve.add_argument("--ip", help="address to listen on (default: localhost)")
    serve.add_argument("--port", type=int, help="port to listen on (default: 8888 or the next)")
    serve.add_argument("--token", help="the Jupyter token (default: a random one, printed)")
    serve.add_argument("--data-dir", help="folder for the queue state, logs and blobs")
    serve.add_argument(
        "--public", action="store_true", help="open every queue but 'local' without credentials"
    )

    worker = commands.add_parser(
        "worker",
        help="run a worker: take jobs from queues and run them as Docker containers",
        description="Serve one or more queues of a host with this machine's Docker engine.",
    )
    from ..worker.cli_args import add_arguments

    add_arguments(worker)

    _job_parsers(commands)

    queue = commands.add_parser("queue", help="manage queues")
    queue_commands = queue.add_subparsers(dest="queue_command", required=True, metavar="ACTION")
    token = queue_commands.add_parser(
        "token",
        help="print a worker token for a queue",
        description="Print the credential that admits a worker to one queue of this host, and "
        "to nothing else. Run it where the host keeps its data dir.",
    )
    token.add_argument("queue")
    token.add_argument("--data-dir", help="the host's data dir (default: the host's default)")
    status = _command(
        queue_commands,
        "status",
        jobs.queue_status,
        "show a queue: counts by state, workers, the oldest queued run",
    )
    status.add_argument("queue", metavar="QUEUE")
    status.add_argument("--json", action="store_true", help="print the host's JSON")
    _command(
        queue_commands,
        "new",
        jobs.queue_new,
        "print a new unguessable queue name (128 bits of randomness), and its URL",
        "The name is on the first line of stdout, alone; the queue's URL on the host follows "
        "when a host is found (--url, $COMPUTE_QUEUE_URL or a running Jupyter server; nothing "
        "is asked of it). Without a host only the name is printed, with a note on stderr.",
        codes=False,
    )
    return parser


class _Formatter(argparse.HelpFormatter):
    """Descriptions wrapped to the terminal; text with line breaks (the exit-code tables) kept
    as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _command(
    group: Any,
    name: str,
    handler: jobs.Handler,
    help: str,
    description: str | None = None,
    codes: bool = True,
) -> argparse.ArgumentParser:
    """A subcommand that talks to a host: ``--url``/``--token``, and its exit codes."""
    waits = handler in (jobs.job_add, jobs.job_wait)
    parser: argparse.ArgumentParser = group.add_parser(
        name,
        help=help,
        description=description or help[0].upper() + help[1:] + ".",
        epilog=(jobs.EXIT_CODES + ("\n" + jobs.WAIT_CODES if waits else "")) if codes else None,
        formatter_class=_Formatter,
    )
    parser.set_defaults(handler=handler)
    host = parser.add_argument_group("host")
    host.add_argument(
        "--url",
        help="the Jupyter server URL with its base URL (default: $COMPUTE_QUEUE_URL, else the "
        "Jupyter server running here)",
    )
    host.add_argument("--token", help="its token (default: $COMPUTE_QUEUE_TOKEN, or the server's)")
    return parser


def _job_parsers(commands: Any) -> None:
    job = commands.add_parser("job", help="send jobs to a queue, follow them, fetch outputs")
    actions = job.add_subparsers(dest="job_command", required=True, metavar="ACTION")
    add = _command(
        actions,
        "add",
        jobs.job_add,
        "send a job to a queue",
        "Send a job to QUEUE: from the options, or from a JSON definition (or envelope) on "
        "stdin ('-') or in a file, with the options on top. Prints the job id and its URL; "
        "with --wait, streams its log instead (the job's stdout to stdout, its stderr and the "
        "system's lines to stderr) and exits with the job's code.",
    )
    add.add_argument("queue", metavar="QUEUE", help="the queue to send it to")
    add.add_argument(
        "definition", nargs="?", metavar="DEFINITION", help="'-' (stdin) or a JSON file"
    )
    add.add_argument("-i", "--image", help="the image to run")
    add.add_argument("-c", "--command", help="the command (shell syntax runs in /bin/sh -c)")
    add.add_argument(
        "-f",
        "--file",
        action="append",
        default=[],
        metavar="[DEST=]PATH",
        help="a local file or folder, put in /inputs under its name (or DEST); repeatable",
    )
    add.add_argument(
        "-e", "--env", action="append", default=[], metavar="K=V", help="environment; repeatable"
    )
    add.add_argument(
        "--secret",
        action="append",
        default=[],
        metavar="NAME",
        help="an environment variable passed as a secret: its value (from this shell's "
        "environment) goes with the submission, not into the job; repeatable",
    )
    add.add_argument("--cpus", type=float, help="CPUs the job needs (e.g. 2, 0.5)")
    add.add_argument("--memory", metavar="SIZE", help="memory the job needs (e.g. 512m, 4g)")
    add.add_argument("--gpus", type=int, help="GPUs the job needs")
    add.add_argument("--max-duration", metavar="D", help="time limit (e.g. 90s, 20m, 1h)")
    add.add_argument("--namespace", help="who holds the run (see docs/cli.md)")
    add.add_argument("--rerun", action="store_true", help="run again even if a result is cached")
    add.add_argument("-w", "--wait", action="store_true", help="stream the log, wait for the end")
    add.add_argument(
        "-o", "--outputs", metavar="DIR", help="download the outputs to DIR (implies --wait)"
    )
    add.add_argument("--timeout", type=float, metavar="S", help="stop waiting after S seconds")

    for name, handler, help in (
        ("get", jobs.job_get, "print a job's JSON: its definition and runs"),
        ("logs", jobs.job_logs, "print a job's log"),
        ("cancel", jobs.job_cancel, "cancel a job's unfinished run"),
        ("wait", jobs.job_wait, "wait for a job to finish; exit with its code"),
        ("outputs", jobs.job_outputs, "download a finished job's outputs"),
    ):
        sub = _command(actions, name, handler, help)
        sub.add_argument("job_id", metavar="JOB_ID", help="a job id (or a prefix, with --queue)")
        sub.add_argument("--queue", help="the job's queue (default: its newest run anywhere)")
        if name in ("logs", "wait", "outputs"):
            sub.add_argument("--run", help="a run id other than the newest")
        if name == "logs":
            sub.add_argument("-f", "--follow", action="store_true", help="follow it live")
        if name == "cancel":
            sub.add_argument("--namespace", help="only let go of the run as this holder")
        if name == "wait":
            sub.add_argument("--timeout", type=float, metavar="S", help="give up after S seconds")
        if name == "outputs":
            sub.add_argument(
                "-o",
                "--output",
                metavar="PATH",
                help="folder (default ./outputs/<short id>), or with --zip the zip file or a "
                "folder for it (default ./outputs/<short id>.zip)",
            )
            sub.add_argument("--zip", action="store_true", help="all outputs as one zip")

    listing = _command(actions, "list", jobs.job_list, "list a queue's runs, newest first")
    listing.add_argument("queue", metavar="QUEUE")
    listing.add_argument(
        "--state",
        action="append",
        type=str.capitalize,
        choices=["Queued", "Running", "Finished"],
        help="only runs in this state; repeatable",
    )
    listing.add_argument("--namespace", help="only runs this holder holds")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    listing.add_argument("--json", action="store_true", help="print the run records as JSON")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``jupyter compute-queue``."""
    args, extra = _parser().parse_known_args(argv)
    if args.command == "serve":
        return serve(args, extra)
    if args.command == "worker" and not extra:
        from ..worker.main import main as worker_main

        return worker_main(args)
    if extra:
        print(f"jupyter compute-queue: unknown arguments: {' '.join(extra)}", file=sys.stderr)
        return 2
    if args.command == "queue" and args.queue_command == "token":
        return queue_token(args.queue, args.data_dir)
    return jobs.run(args.handler, args)


def serve(args: argparse.Namespace, extra: list[str]) -> int:
    """Run a Jupyter server with only the compute-queue extension."""
    from ..host.datadir import default_data_dir
    from ..server.app import ComputeQueueApp

    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
    empty_root = data_dir / "empty-root"  # a queue host serves no notebook files
    empty_root.mkdir(parents=True, exist_ok=True)
    argv = [
        f"--ComputeQueueApp.data_dir={data_dir}",
        f"--ServerApp.root_dir={empty_root}",
        "--ServerApp.terminals_enabled=False",
        "--ServerApp.open_browser=False",
    ]
    if args.ip:
        argv.append(f"--ServerApp.ip={args.ip}")
    if args.port:
        argv.append(f"--ServerApp.port={args.port}")
    if args.token is not None:
        argv.append(f"--IdentityProvider.token={args.token}")
    if args.public:
        argv.append("--ComputeQueueApp.public=True")
    ComputeQueueApp.load_other_extensions = False
    ComputeQueueApp.serve_mode = True
    ComputeQueueApp.launch_instance(argv + extra)  # type: ignore[no-untyped-call]
    return 0


def queue_token(queue: str, data_dir: str | None) -> int:
    """Print ``QUEUE:TOKEN`` for a worker of ``queue``."""
    from ..host.datadir import default_data_dir, host_secret

    try:
        check_queue_name(queue)
    except ValueError as exc:
        print(f"jupyter compute-queue: {exc}", file=sys.stderr)
        return 2
    folder = Path(data_dir).expanduser() if data_dir else default_data_dir()
    print(worker_credential(host_secret(folder), queue))
    return 0


if __name__ == "__main__":
    sys.exit(main())
