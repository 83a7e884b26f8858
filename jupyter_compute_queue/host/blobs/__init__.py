"""Content-addressed blob stores (key = lowercase hex SHA-256 of the bytes).

The concrete stores live in submodules (``blobs.local``) so importing this package stays light.
"""

from .base import (
    BlobError,
    BlobHashMismatch,
    BlobInfo,
    BlobNotFound,
    BlobStore,
    BlobTooLarge,
    BlobWriter,
    InvalidBlobKey,
    check_key,
)

__all__ = [
    "BlobError",
    "BlobHashMismatch",
    "BlobInfo",
    "BlobNotFound",
    "BlobStore",
    "BlobTooLarge",
    "BlobWriter",
    "InvalidBlobKey",
    "check_key",
]
