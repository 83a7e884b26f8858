"""What the queue service and its worker side share: user-facing errors and configuration."""

from __future__ import annotations

from dataclasses import dataclass

DAY = 86400.0


class ServiceError(Exception):
    """An error whose message is for the user; ``status`` is the HTTP status it maps to."""

    status = 400


class BadRequest(ServiceError, ValueError):
    """The request itself is wrong; the message names what."""


class Forbidden(ServiceError):
    """The caller may not do this (or may not know the thing exists)."""

    status = 403


class TooLarge(ServiceError):
    """A body over a configured limit."""

    status = 413


@dataclass
class ServiceConfig:
    """The knobs the service needs (the server extension fills them from its traitlets)."""

    lease_seconds: float = 30.0
    max_lost: int = 3
    retention_days: float = 30.0
    cache_scope: str = "queue"  # "queue", or "host" to share results across private queues
    max_definition_bytes: int = 4 * 1024 * 1024
    public: bool = False
    sweep_batch: int = 500
    retention_interval: float = 3600.0
    #: Blobs nothing refers to are deleted once nobody touched them for this long.
    blob_grace_seconds: float = DAY
    #: Attempts to send a callback before giving up, and the backoff between them: the first
    #: retry after ``callback_backoff`` seconds, doubling up to ``callback_backoff_max``.
    callback_attempts: int = 10
    callback_backoff: float = 2.0
    callback_backoff_max: float = 600.0
    #: Seconds to connect to a callback's receiver, and for it to answer.
    callback_timeout: float = 10.0
    #: Metrics label only queues active within this many seconds (or with unfinished runs or
    #: connected workers).
    metrics_window: float = 3600.0
