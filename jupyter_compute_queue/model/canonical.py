"""Canonical JSON: the one byte form of a JSON value that ids and hashes are taken of.

A job id (SPEC §2), a json DataRef's bytes and a built image's tag all hash this form, so two
spellings of the same value (key order, spacing, ``2.0`` for ``2``) hash the same.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
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


def lone_surrogate(value: Any) -> tuple[str, int] | None:
    """Where ``value`` (JSON-like: mappings, lists, strings) holds a string with a lone UTF-16
    surrogate, which no UTF-8 encoder takes (Python's json reads ``"\\ud800"`` into one, so the
    canonical form of such a value cannot be written): its path (``env.A``, ``command[1]``; a
    mapping's own path for a key) and the code point; None if nowhere."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        where, node = stack.pop()
        if isinstance(node, str):
            if not node.isascii():
                try:
                    node.encode("utf-8")
                except UnicodeEncodeError as exc:
                    return where, ord(node[exc.start])
        elif isinstance(node, Mapping):
            for key, item in node.items():
                stack.append((where, key))  # a key is text too
                stack.append((f"{where}.{key}" if where else str(key), item))
        elif isinstance(node, (list, tuple)):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(node))
    return None


def surrogate_message(code: int) -> str:
    return f"holds a lone UTF-16 surrogate (\\u{code:04x}), which is not a character"
