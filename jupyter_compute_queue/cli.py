"""``jupyter compute-queue …``: serve a queue host, and manage queues.

The worker, job and remaining queue commands arrive with their issues; each subcommand is a
small function here that calls the package's API.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

from .access import check_queue_name, worker_credential


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
    from .worker.cli_args import add_arguments

    add_arguments(worker)

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
    queue_commands.add_parser(
        "new", help="print a new unguessable queue name (128 bits of randomness)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``jupyter compute-queue``."""
    args, extra = _parser().parse_known_args(argv)
    if args.command == "serve":
        return serve(args, extra)
    if args.command == "worker" and not extra:
        from .worker.main import main as worker_main

        return worker_main(args)
    if extra:
        print(f"jupyter compute-queue: unknown arguments: {' '.join(extra)}", file=sys.stderr)
        return 2
    if args.queue_command == "token":
        return queue_token(args.queue, args.data_dir)
    print(secrets.token_hex(16))
    return 0


def serve(args: argparse.Namespace, extra: list[str]) -> int:
    """Run a Jupyter server with only the compute-queue extension."""
    from .datadir import default_data_dir
    from .server.app import ComputeQueueApp

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
    from .datadir import default_data_dir, host_secret

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
