"""The worker's command-line options (light: parsing them imports neither Docker nor tornado)."""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The worker's command-line options."""
    parser.add_argument("queues", nargs="+", metavar="QUEUE", help="queues to serve")
    parser.add_argument(
        "--url", help="the Jupyter server's URL with its base URL (default: $COMPUTE_QUEUE_URL)"
    )
    parser.add_argument(
        "--token",
        help="the Jupyter token or a worker credential QUEUE:TOKEN (default: $COMPUTE_QUEUE_TOKEN)",
    )
    parser.add_argument(
        "--cpus",
        type=float,
        default=float(os.cpu_count() or 1),
        help="CPUs to offer (default: all)",
    )
    parser.add_argument(
        "--memory",
        help="memory to offer, e.g. 16g; also the limit of a job "
        "that names none (default: not accounted)",
    )
    parser.add_argument("--gpus", default=None, help="N, all, or device=I,J (default: none)")
    parser.add_argument("--tags", default="", help="comma-separated tags jobs may ask for")
    parser.add_argument("--max-job-duration", default="1h", help="longest job to run (1h)")
    parser.add_argument("--data-dir", help="the worker's folder (id, cache, run folders)")
    parser.add_argument(
        "--network",
        choices=["bridge", "none", "internal"],
        default="bridge",
        help="bridge: the worker's own network, with a route out (the default); internal: no "
        "route off this machine; none: no network. As root the worker refuses jobs' traffic to "
        "this machine, its LAN and private and link-local addresses (docs/worker.md, Isolation)",
    )
    parser.add_argument(
        "--allow-egress",
        action="append",
        default=[],
        metavar="ADDR[/BITS][:PORT]",
        help="a private address or network (and port) jobs may reach all the same, e.g. a "
        "package mirror 10.0.0.5:3128, and the worker may fetch a job's url inputs and build "
        "contexts from (those are refused on this machine, its LAN and private and link-local "
        "addresses whatever --network says); repeat for several",
    )
    parser.add_argument("--container-user", choices=["worker", "image"], default="worker")
    parser.add_argument(
        "--max-output-bytes",
        default="1g",
        help="cap on a run's /outputs: past it the job is stopped (Error) (default: 1g)",
    )
    parser.add_argument(
        "--max-disk-bytes",
        help="cap on all a run writes to this machine's disk: /outputs, its container's own "
        "files (/tmp …) and what /inputs and the queue's /job-cache grow by; past it the job is "
        "stopped (Error). The container's files and /job-cache are measured every 5 s "
        "(default: --max-output-bytes + 10g)",
    )
    parser.add_argument(
        "--max-cache-bytes",
        default="10g",
        help="size of the worker's content cache of inputs (files fetched by their hash, kept "
        "between runs); past it, the files used longest ago are removed (default: 10g)",
    )
    parser.add_argument("--id", help="the worker id (default: one kept in the data dir)")
    parser.add_argument("--grace", default="30s", help="SIGTERM grace before giving runs back")
    parser.add_argument(
        "--runtime",
        choices=["docker", "noop"],
        default="docker",
        help="docker: run each job as a container (the default). noop: run nothing and report "
        "every job done at once, for benchmarks of the queue itself; never for real jobs",
    )
