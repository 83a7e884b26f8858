"""A blob's key: the lowercase hex SHA-256 of its bytes, checked the same on every side."""

from __future__ import annotations

import re

# fullmatch, not `$`: `$` would accept a trailing newline.
_KEY_RE = re.compile(r"[0-9a-f]{64}")


class BlobError(Exception):
    """Base class of blob errors (the blob stores' own are in ``host/blobs``)."""


class InvalidBlobKey(BlobError, ValueError):
    """The key is not 64 lowercase hex characters."""


def check_key(key: str) -> str:
    """Return ``key`` if it is 64 lowercase hex characters, else raise InvalidBlobKey."""
    if not isinstance(key, str) or _KEY_RE.fullmatch(key) is None:
        shown = repr(key)
        if len(shown) > 100:
            shown = shown[:97] + "..."
        raise InvalidBlobKey(f"invalid blob key {shown}: expected 64 lowercase hex characters")
    return key
