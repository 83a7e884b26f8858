"""The ``%%container`` cell magic: run a cell's body in a container job (SPEC §9).

``%load_ext jupyter_compute_queue`` registers it. The body is shipped as an input file and run
by the interpreter of ``--run`` in ``/inputs``; the cell blocks until the job finishes (Run-All
needs that), showing the log as it comes; an interrupt cancels the job; a job that does not
succeed raises after its log, so Run-All stops. The cell's value is the :class:`Job`.

The options are an argparse parser, so ``%%container?`` shows its help and a bad option is a
one-line usage error. Following the job (logs, hints, interrupt) lives in
:mod:`~jupyter_compute_queue.notebook.cell_follow`.
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..client.errors import ComputeQueueError

#: The image when ``--image`` is not given and ``$COMPUTE_QUEUE_IMAGE`` is not set.
DEFAULT_IMAGE = "python:3.12-slim"

#: File extensions of the cell's body per interpreter (the rest get none).
EXTENSIONS = {"sh": ".sh", "bash": ".sh", "dash": ".sh", "python": ".py", "python3": ".py"}
#: Extensions of R and Julia, which refuse scripts without theirs.
EXTENSIONS.update({"Rscript": ".R", "julia": ".jl", "node": ".js", "perl": ".pl"})


class UsageError(ComputeQueueError):
    """A bad ``%%container`` line: shown as one line, without a traceback."""

    def _render_traceback_(self) -> list[str]:
        return [f"UsageError: {self}"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would exit the kernel
        raise UsageError(f"%%container: {message} (see %%container?)")

    def exit(self, status: int = 0, message: str | None = None) -> Any:
        raise UsageError(message or "%%container: see %%container?")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="%%container",
        add_help=False,
        description="Run this cell's body in a container job of a compute queue. The body is "
        "saved as a file in /inputs (the working directory) and run with the interpreter of "
        "--run. The cell blocks until the job finishes and shows its log live; interrupting "
        "the kernel cancels the job; a job that does not succeed raises after its log. "
        "Re-running an unchanged cell returns the cached result at once; re-running a "
        "changed one releases the previous run. The cell's value is the Job.",
        epilog="Example:  %%container --image python:3.12-slim --gpus 1 -f data.csv --run python",
    )
    add = parser.add_argument
    add("-q", "--queue", default="local", help="queue to send the job to (default: local)")
    add(
        "-i",
        "--image",
        help=f"container image (default: $COMPUTE_QUEUE_IMAGE, else {DEFAULT_IMAGE})",
    )
    add("--cpus", type=float, help="CPUs the job needs, e.g. 2 or 0.5")
    add("--memory", help="memory the job needs, e.g. 512m or 4g")
    add("--gpus", type=int, help="GPUs the job needs")
    add(
        "-f",
        "--file",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="a local file or folder to put in /inputs (under its own name, or NAME); repeat",
    )
    add(
        "-e",
        "--env",
        action="append",
        default=[],
        metavar="KEY[=VALUE]",
        help="an environment variable of the container (KEY alone takes the kernel's value); "
        "repeat",
    )
    add(
        "--secret",
        action="append",
        default=[],
        metavar="NAME",
        help="an environment variable of the container whose value is the kernel's, sent with "
        "the job but not part of it (not in its id or definition, redacted from its log); repeat",
    )
    add("--max-duration", metavar="D", help="stop the job after D, e.g. 90s, 20m, 2h")
    add(
        "--run",
        default="sh",
        metavar="INTERPRETER",
        help="the program that runs the body, e.g. python or 'python -u' (default: sh)",
    )
    add("--no-wait", action="store_true", help="return the Job at once, without waiting")
    add("--rerun", action="store_true", help="run again even if a cached result exists")
    add(
        "-o",
        "--outputs",
        metavar="DIR",
        help="where to download the job's /outputs (default: ./outputs/<short job id>)",
    )
    add("--out", metavar="VAR", help="also store the Job in this variable")
    add("--no-raise", action="store_true", help="do not raise when the job does not succeed")
    return parser


PARSER = _parser()


def parse_line(line: str) -> argparse.Namespace:
    """The options of a ``%%container`` line."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"%%container: {exc}") from None
    args = PARSER.parse_args(words)
    if args.out is not None and not args.out.isidentifier():
        raise UsageError(f"%%container: --out {args.out!r} is not a Python variable name")
    return args


def _pairs(values: list[str], what: str) -> list[tuple[str, str | None]]:
    pairs: list[tuple[str, str | None]] = []
    for value in values:
        key, sep, rest = value.partition("=")
        if not key:
            raise UsageError(f"%%container: {what} {value!r} has no name before '='")
        pairs.append((key, rest if sep else None))
    return pairs


def body_name(run: list[str]) -> str:
    """The file name of the cell's body in /inputs."""
    program = os.path.basename(run[0]) if run else ""
    return "_cell" + EXTENSIONS.get(program, "")


def build_job(
    args: argparse.Namespace, body: str, environ: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The definition and the files of a cell's job."""
    run = shlex.split(args.run)
    if not run:
        raise UsageError("%%container: --run names no program")
    name = body_name(run)
    files: dict[str, Any] = {name: body.encode("utf-8")}
    for dest, path in _pairs(args.file, "--file"):
        local = Path(path if path is not None else dest).expanduser()
        target = dest if path is not None else local.name
        if not local.exists():
            raise UsageError(f"%%container: --file {local}: no such file or folder")
        if target in files:
            what = "the cell's body" if target == name else "another --file"
            raise UsageError(f"%%container: --file {target!r} has the same name as {what}")
        files[target] = local
    env: dict[str, str] = {}
    for key, value in _pairs(args.env, "--env"):
        if value is None:
            if key not in environ:
                raise UsageError(f"%%container: --env {key}: not set in the kernel")
            value = environ[key]
        env[key] = value
    requirements = {
        k: v
        for k, v in (("cpus", args.cpus), ("memory", args.memory), ("gpus", args.gpus))
        if v is not None
    }
    definition: dict[str, Any] = {
        "image": args.image or environ.get("COMPUTE_QUEUE_IMAGE") or DEFAULT_IMAGE,
        "command": [*run, f"/inputs/{name}"],
        "workdir": "/inputs",
    }
    if env:
        definition["env"] = env
    if args.secret:
        definition["secrets"] = sorted(set(args.secret))
    if requirements:
        definition["requirements"] = requirements
    if args.max_duration:
        definition["maxDuration"] = args.max_duration
    return definition, files


def secret_values(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, str]:
    """The kernel's values of the ``--secret`` names (never a value in the cell's text, which
    the notebook keeps)."""
    values: dict[str, str] = {}
    for name in args.secret:
        if "=" in name:
            raise UsageError(
                f"%%container: --secret {name.partition('=')[0]}: give the name only; the value "
                "comes from the kernel's environment (os.environ)"
            )
        if name not in environ:
            raise UsageError(f"%%container: --secret {name}: not set in the kernel's environment")
        values[name] = environ[name]
    return values


def cell_namespace(user: str, notebook: str, cell_id: str | None, body: str) -> str:
    """``cell:`` + a hash of (user, notebook path, cell id): the holder of the cell's run, so a
    changed cell releases its previous run. Without a cell id (a console, an old front end)
    the body stands in for it: each different body is then its own holder."""
    cell = f"id:{cell_id}" if cell_id else "body:" + hashlib.sha256(body.encode()).hexdigest()
    key = "\0".join((user, notebook, cell))
    return "cell:" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:40]


def _current_user(environ: Mapping[str, str]) -> str:
    if environ.get("JUPYTERHUB_USER"):
        return environ["JUPYTERHUB_USER"]
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (a container with an arbitrary uid)
        return str(os.getuid())


def kernel_cell(shell: Any) -> tuple[str, str | None]:
    """The notebook path and the id of the cell being run, as far as the kernel knows them."""
    notebook = str(shell.user_ns.get("__session__") or os.environ.get("JPY_SESSION_NAME") or "")
    parent: Any = None
    kernel = getattr(shell, "kernel", None)
    if kernel is not None:
        try:
            parent = kernel.get_parent()
        except Exception:  # older ipykernel: the shell keeps the parent header
            parent = None
    if not parent:
        parent = getattr(shell, "parent_header", None)
    metadata = parent.get("metadata") if isinstance(parent, dict) else None
    cell_id = metadata.get("cellId") if isinstance(metadata, dict) else None
    return notebook, str(cell_id) if cell_id else None


def container(line: str, cell: str, shell: Any = None) -> Any:
    """Run the cell in a container job (the docstring is replaced by the options' help)."""
    from ..client.client import Client
    from .cell_follow import run_cell

    args = parse_line(line)
    environ = os.environ
    definition, files = build_job(args, cell, environ)
    secrets = secret_values(args, environ)
    notebook, cell_id = kernel_cell(shell) if shell is not None else ("", None)
    namespace = cell_namespace(_current_user(environ), notebook, cell_id, cell)
    client = Client(queue=args.queue)

    def keep(job: Any) -> None:
        if args.out and shell is not None:
            shell.user_ns[args.out] = job

    return run_cell(client, args, definition, files, namespace, keep, shell, secrets)


container.__doc__ = PARSER.format_help()


def load_ipython_extension(shell: Any) -> None:
    """``%load_ext jupyter_compute_queue``: register ``%%container``."""

    def magic(line: str, cell: str) -> Any:
        return container(line, cell, shell)

    magic.__doc__ = container.__doc__
    shell.register_magic_function(magic, magic_kind="cell", magic_name="container")
