"""Secrets on the worker: the values of a run's secrets, and their redaction from its log.

A worker that got no value for a name in the assignment takes ``COMPUTE_QUEUE_SECRET_<NAME>``
from its own environment (:func:`resolve`); it replaces every value in the log text it sends
(:class:`Redactor`). The host's side is :mod:`..host.secrets`; docs/design.md, "Secrets", has
the rules.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

#: A worker's own value of secret NAME is its environment variable of this prefix + NAME. Not
#: NAME itself: a job must not be able to ask a worker for any variable of its environment
#: (its token, a cloud credential); the operator chooses what a worker offers.
WORKER_ENV_PREFIX = "COMPUTE_QUEUE_SECRET_"
#: Values shorter than this are not redacted from logs (a value "1" would mangle every line).
MIN_REDACTED = 4
MASK = "***"
#: How far back a log chunk's end is searched for the start of a value split across chunks.
_MAX_HELD = 1024


def resolve(
    names: Iterable[str], given: object, environ: Mapping[str, str]
) -> tuple[dict[str, str], list[str]]:
    """The worker's values for a run's secrets: those of the assignment, else its own
    ``COMPUTE_QUEUE_SECRET_<NAME>``; returns (values, names with no value)."""
    sent = given if isinstance(given, Mapping) else {}
    values: dict[str, str] = {}
    missing: list[str] = []
    for name in names:
        value = sent.get(name)
        if not isinstance(value, str):
            value = environ.get(WORKER_ENV_PREFIX + name)
        if value is None:
            missing.append(name)
        else:
            values[name] = value
    return values, missing


def missing_message(missing: Sequence[str]) -> str:
    """Why a run cannot start: the secrets it has no value for, and what to do."""
    names = ", ".join(missing)
    return (
        f"no value for secret {names}: none came with the run (the submission did not send it, "
        "or the host restarted since: it keeps secret values in memory only) and this worker "
        f"has no {WORKER_ENV_PREFIX}{missing[0]}; submit the job again with the value"
    )


class Redactor:
    """Replaces secret values in a run's log text with ``***``, per stream, also when a value is
    split across two chunks: the end of a chunk that could be the start of a value is held back
    until the next chunk (or :meth:`flush`) shows whether it is one."""

    def __init__(self, values: Iterable[str]) -> None:
        # Longest first, so a value that contains another is replaced whole.
        self.values = sorted({v for v in values if len(v) >= MIN_REDACTED}, key=len, reverse=True)
        self._held: dict[str, str] = {}

    def __bool__(self) -> bool:
        return bool(self.values)

    def feed(self, stream: str, text: str) -> str:
        """The text of ``stream`` that can be sent now, values replaced."""
        text = self._held.pop(stream, "") + text
        cut = self._hold_from(text)
        if cut < len(text):
            self._held[stream] = text[cut:]
        return self._redact(text[:cut])

    def flush(self) -> list[tuple[str, str]]:
        """What is held back, per stream, values replaced (at the end of the run)."""
        held, self._held = self._held, {}
        return [(stream, self._redact(text)) for stream, text in held.items() if text]

    def _redact(self, text: str) -> str:
        for value in self.values:
            if value in text:
                text = text.replace(value, MASK)
        return text

    def _hold_from(self, text: str) -> int:
        """Where the part of ``text`` to hold back starts: at the start of an end that begins
        some value, or earlier, at the start of a whole value that runs into that end (so a
        value inside a longer one is not replaced before the longer one shows)."""
        cut = self._value_start(text)
        moved = True
        while moved:
            moved = False
            for value in self.values:
                at = text.find(value, max(0, cut - len(value) + 1))
                if at != -1 and at < cut:  # it starts before the cut and ends after it
                    cut, moved = at, True
        return cut

    def _value_start(self, text: str) -> int:
        """Where the longest end of ``text`` that begins some value starts (len: none does)."""
        cut = len(text)
        for value in self.values:
            start = max(0, len(text) - min(len(value) - 1, _MAX_HELD))
            at = text.find(value[0], start)
            while at != -1 and at < cut:
                if value.startswith(text[at:]):
                    cut = at
                    break
                at = text.find(value[0], at + 1)
        return cut
