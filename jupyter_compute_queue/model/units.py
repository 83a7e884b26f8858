"""Sizes and durations as people write them (``512m``, ``4g``, ``90s``, ``1h30m``).

Sizes follow Docker's units: binary multiples, case-insensitive, an optional ``b``/``ib``
suffix (``4g`` = ``4gb`` = ``4GiB`` = 4 * 1024**3 bytes). A bare number is bytes. Durations are
seconds, or a sequence of ``<number><unit>`` with units ``ms``, ``s``, ``m``, ``h``, ``d``;
fractional seconds round up so a limit is never shorter than asked.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)

_DURATION_UNITS: dict[str, Fraction | int] = {
    "ms": Fraction(1, 1000),
    "s": 1,
    "m": 60,
    "h": 3600,
    "d": 86400,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"^\s*\d+(?:\.\d+)?\s*$")


#: Docker (and SQLite) keep sizes and durations as signed 64-bit integers.
_MAX = 2**63 - 1


def _whole(number: float | Fraction, value: object, what: str) -> int:
    """``number`` rounded up; too large (even infinite) is a ValueError, not an OverflowError."""
    if not number <= _MAX:  # also refuses inf and NaN; an exact comparison for huge ints
        raise ValueError(f"{value!r} is too large for a {what}")
    return math.ceil(number)


def parse_size(value: object) -> int:
    """Bytes of a size such as ``512m``, ``4g``, ``1.5GiB`` or ``1048576``.

    Raises ``ValueError`` with a message saying what is accepted.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value!r} is not a size")
        return _whole(value, value, "size")
    if isinstance(value, float):
        if value < 0 or math.isnan(value):
            raise ValueError(f"{value!r} is not a size")
        return _whole(value, value, "size")
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match:
            number, unit = match.groups()
            # Exact arithmetic: floats would round "3004.2t" down and 2**63 - 1 up.
            return _whole(Fraction(number) * _SIZE_UNITS[unit.lower()], value, "size")
    raise ValueError(f"{value!r} is not a size: use bytes or Docker's units, like '512m' or '4g'")


def parse_duration(value: object) -> int:
    """Whole seconds of a duration such as ``90s``, ``20m``, ``1h30m`` or ``3600``.

    Raises ``ValueError`` with a message saying what is accepted.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value!r} is not a duration")
        return _whole(value, value, "duration")
    if isinstance(value, float):
        if value < 0 or math.isnan(value):
            raise ValueError(f"{value!r} is not a duration")
        return _whole(value, value, "duration")
    if isinstance(value, str):
        text = value.strip().replace(" ", "")
        if _NUMBER_RE.match(text):
            return _whole(Fraction(text), value, "duration")
        parts = _DURATION_PART.findall(text)
        if parts and "".join(n + u for n, u in parts) == text:
            seconds = sum(Fraction(n) * _DURATION_UNITS[u.lower()] for n, u in parts)
            return _whole(seconds, value, "duration")
    raise ValueError(
        f"{value!r} is not a duration: use seconds or units like '90s', '20m', '1h30m'"
    )
