"""Canonical JSON: the one byte form of a JSON value that ids and hashes are taken of.

A job id (SPEC §2), a json DataRef's bytes and a built image's tag all hash this form, so two
spellings of the same value (key order, spacing, ``2.0`` for ``2``) hash the same.
"""

from __future__ import annotations

import json
import math
from typing import Any


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no spaces, UTF-8 without escapes, integral numbers as integers."""
    return json.dumps(
        integral_numbers(value),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    ).encode()


def integral_numbers(value: Any) -> Any:
    """The value with every integral float (``2.0``) an int, recursively."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: integral_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [integral_numbers(v) for v in value]
    return value
