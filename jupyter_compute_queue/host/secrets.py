"""Secrets on the host: environment variables a job names in its definition but whose values
it never holds.

The definition's ``secrets`` lists names (they are part of the job id, see
:mod:`..model.jobs`). The values come with a submission (:func:`check_values`), stay in the
host's memory only while the run is unfinished (:class:`SecretBox`), reach the worker in the
run's assignment, and go into the container's environment; the worker's side is
:mod:`..worker.secrets`. docs/design.md, "Secrets", has the rules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

#: A value may be at most this many bytes (UTF-8), and all values of a submission this many.
MAX_VALUE_BYTES = 64 * 1024
MAX_TOTAL_BYTES = 256 * 1024


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
