"""Sizes and durations as people write them (``512m``, ``4g``, ``90s``, ``1h30m``).

Sizes follow Docker's units: binary multiples, case-insensitive, an optional ``b``/``ib``
suffix (``4g`` = ``4gb`` = ``4GiB`` = 4 * 1024**3 bytes). A bare number is bytes. Durations are
seconds, or a sequence of ``<number><unit>`` with units ``ms``, ``s``, ``m``, ``h``, ``d``;
fractional seconds round up so a limit is never shorter than asked.
"""

from __future__ import annotations

import math
import re

_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)

_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"^\s*\d+(?:\.\d+)?\s*$")


def parse_size(value: object) -> int:
    """Bytes of a size such as ``512m``, ``4g``, ``1.5GiB`` or ``1048576``.

    Raises ``ValueError`` with a message saying what is accepted.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, (int, float)):
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"{value!r} is not a size")
        return math.ceil(value)
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match:
            number, unit = match.groups()
            return math.ceil(float(number) * _SIZE_UNITS[unit.lower()])
    raise ValueError(f"{value!r} is not a size: use bytes or Docker's units, like '512m' or '4g'")


def parse_duration(value: object) -> int:
    """Whole seconds of a duration such as ``90s``, ``20m``, ``1h30m`` or ``3600``.

    Raises ``ValueError`` with a message saying what is accepted.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, (int, float)):
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"{value!r} is not a duration")
        return math.ceil(value)
    if isinstance(value, str):
        text = value.strip().replace(" ", "")
        if _NUMBER_RE.match(text):
            return math.ceil(float(text))
        parts = _DURATION_PART.findall(text)
        if parts and "".join(n + u for n, u in parts) == text:
            seconds = sum(float(n) * _DURATION_UNITS[u.lower()] for n, u in parts)
            return math.ceil(round(seconds, 6))
    raise ValueError(
        f"{value!r} is not a duration: use seconds or units like '90s', '20m', '1h30m'"
    )
