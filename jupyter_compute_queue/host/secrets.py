"""Secrets: environment variables a job names in its definition but whose values it never holds.

The definition's ``secrets`` lists names (they are part of the job id, see :mod:`.jobs`). The
values come with a submission (:func:`check_values`), stay in the host's memory only while the
run is unfinished (:class:`SecretBox`), reach the worker in the run's assignment, and go into
the container's environment. A worker that got no value for a name takes
``COMPUTE_QUEUE_SECRET_<NAME>`` from its own environment (:func:`resolve`); it replaces every
value in the log text it sends (:class:`Redactor`). docs/design.md, "Secrets", has the rules.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

#: A value may be at most this many bytes (UTF-8), and all values of a submission this many.
MAX_VALUE_BYTES = 64 * 1024
MAX_TOTAL_BYTES = 256 * 1024
#: A worker's own value of secret NAME is its environment variable of this prefix + NAME. Not
#: NAME itself: a job must not be able to ask a worker for any variable of its environment
#: (its token, a cloud credential); the operator chooses what a worker offers.
WORKER_ENV_PREFIX = "COMPUTE_QUEUE_SECRET_"
#: Values shorter than this are not redacted from logs (a value "1" would mangle every line).
MIN_REDACTED = 4
MASK = "***"
#: How far back a log chunk's end is searched for the start of a value split across chunks.
_MAX_HELD = 1024


def check_values(values: object, names: Sequence[str]) -> dict[str, str]:
    """A submission's ``secrets`` map, checked against the definition's names; ``ValueError``
    whose message starts with the offending field (never with a value)."""
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise ValueError("secrets: a map of NAME to value")
    listed = set(names)
    total = 0
    checked: dict[str, str] = {}
    for name, value in values.items():
        if name not in listed:
            known = ", ".join(sorted(listed)) or "none"
            raise ValueError(
                f"secrets.{name}: not a secret of the job's definition (it lists: {known})"
            )
        if not isinstance(value, str):
            raise ValueError(f"secrets.{name}: the value must be a string")
        if "\x00" in value:
            raise ValueError(f"secrets.{name}: the value may not contain a NUL character")
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > MAX_VALUE_BYTES:
            raise ValueError(f"secrets.{name}: the value is over {MAX_VALUE_BYTES} bytes")
        total += size
        checked[name] = value
    if total > MAX_TOTAL_BYTES:
        raise ValueError(f"secrets: the values add up to over {MAX_TOTAL_BYTES} bytes")
    return checked


class SecretBox:
    """The host's secret values, by run id, in memory only: never in the store, the logs, a
    record or a callback. A host restart forgets them (the worker then falls back on its own)."""

    def __init__(self) -> None:
        self._runs: dict[str, dict[str, str]] = {}

    def keep(self, run_id: str, values: Mapping[str, str]) -> None:
        """Values for an unfinished run: the first value of each name stays (a submission that
        joins the run adds only the names it does not have yet)."""
        if values:
            held = self._runs.setdefault(run_id, {})
            for name, value in values.items():
                held.setdefault(name, value)

    def get(self, run_id: str) -> dict[str, str]:
        """The values to send with the run's assignment (empty when there are none)."""
        return dict(self._runs.get(run_id, {}))

    def drop(self, run_id: str) -> None:
        """The run finished (or was cancelled, replaced, lost): forget its values."""
        self._runs.pop(run_id, None)

    def __len__(self) -> int:
        return len(self._runs)


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
