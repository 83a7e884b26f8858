"""A job's command as the argv it runs (SPEC §2): lists as given, shell syntax through
``/bin/sh -c``, anything else split as a shell would (shlex).

The host checks a definition's command with it (an unbalanced quote is refused at submission)
and the worker runs what it gives, so both read a command the same way.
"""

from __future__ import annotations

import shlex

#: A ``command`` or ``entrypoint``: a string, a list of words, or None for the image's own.
Command = str | list[str] | None

_SHELL_CHARS = frozenset("$`|&;<>()*?[]~\n")


def needs_shell(command: str) -> bool:
    """True when the string has shell syntax outside single quotes (SPEC §2)."""
    single = double = escaped = False
    for char in command:
        if single:
            single = char != "'"
        elif escaped:
            escaped = False
            if char in _SHELL_CHARS:
                return True
        elif char == "\\":
            escaped = True
        elif char == '"':
            double = not double
        elif char == "'" and not double:
            single = True
        elif char in _SHELL_CHARS:
            return True
    return False


def command_argv(command: Command) -> list[str] | None:
    """The argv a command runs as: lists as given, shell syntax via ``/bin/sh -c``, else shlex.

    ``None`` means the image's own default. Raises ``ValueError`` for unbalanced quotes.
    """
    if command is None:
        return None
    if isinstance(command, list):
        return list(command)
    if needs_shell(command):
        return ["/bin/sh", "-c", command]
    try:
        return shlex.split(command)
    except ValueError as exc:
        raise ValueError(f"cannot split {command!r} into words: {exc}") from None
