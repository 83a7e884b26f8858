"""Who may do what: the one access policy of SPEC §8.

Every operation that names or resolves to a queue asks :meth:`AccessPolicy.allowed`; handlers
only establish the identity (Jupyter auth, a worker token, or nobody).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from enum import Enum
from typing import Literal

#: The queue of the host's own local worker: never public.
LOCAL_QUEUE = "local"
QUEUE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
NAMESPACE_RE = re.compile(r"^[A-Za-z0-9:._-]{1,128}$")


class Action(str, Enum):
    """What a caller wants to do."""

    READ = "read"  # see a queue's runs, a job, its logs and outputs
    SUBMIT = "submit"  # queue jobs (and copy jobs into the queue)
    CANCEL = "cancel"  # cancel runs
    DELETE = "delete"  # forget cached results
    WORK = "work"  # register as a worker and run the queue's jobs
    BLOB_READ = "blob_read"  # download a blob by key (no queue)
    BLOB_WRITE = "blob_write"  # upload a blob (no queue)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling: a Jupyter user, a worker holding a queue's token, or nobody."""

    kind: Literal["user", "worker", "anonymous"]
    name: str = ""
    #: For worker tokens: the queues they admit to (one token per queue).
    queues: frozenset[str] = frozenset()


ANONYMOUS = Identity("anonymous")


def check_queue_name(queue: str) -> str:
    """The queue name, or ValueError saying what a name may be."""
    if not QUEUE_NAME_RE.match(queue):
        raise ValueError(
            f"queue name {queue!r} is not valid: 1 to 128 characters of letters, digits, '.', "
            "'_' and '-', starting with a letter or digit"
        )
    return queue


def check_namespace(namespace: str) -> str:
    """The namespace, or ValueError saying what a namespace may be."""
    if not NAMESPACE_RE.match(namespace):
        raise ValueError(
            f"namespace {namespace!r} is not valid: 1 to 128 characters of letters, digits, "
            "':', '.', '_' and '-'"
        )
    return namespace


def worker_token(secret: bytes, queue: str) -> str:
    """The token that admits a worker to one queue: an HMAC of the queue name."""
    return hmac.new(secret, f"worker:{queue}".encode(), hashlib.sha256).hexdigest()


def check_worker_token(secret: bytes, queue: str, token: str) -> bool:
    """True when ``token`` is the worker token of ``queue`` (constant-time comparison)."""
    return hmac.compare_digest(worker_token(secret, queue), token)


def worker_credential(secret: bytes, queue: str) -> str:
    """What a worker presents for a queue: ``QUEUE:TOKEN`` (several joined by commas)."""
    return f"{queue}:{worker_token(secret, queue)}"


def worker_identity(secret: bytes, credentials: str) -> Identity | None:
    """The worker identity for ``QUEUE:TOKEN[,QUEUE:TOKEN…]``, or None if any part is wrong."""
    queues = set()
    for part in credentials.split(","):
        queue, sep, token = part.strip().rpartition(":")
        if (
            not sep
            or not QUEUE_NAME_RE.match(queue)
            or not check_worker_token(secret, queue, token)
        ):
            return None
        queues.add(queue)
    return Identity("worker", queues=frozenset(queues))


class AccessPolicy:
    """The rules of SPEC §8 for one host."""

    def __init__(self, *, public: bool = False) -> None:
        self.public = public

    def may_read_some_queue(self, identity: Identity) -> bool:
        """Whether any queue's jobs could be visible to this caller (else a global lookup
        is refused outright rather than answered "not found")."""
        return identity.kind == "user" or self.public

    def is_private(self, queue: str) -> bool:
        """A private queue needs Jupyter credentials; in public mode only ``local`` is."""
        return not self.public or queue == LOCAL_QUEUE

    def allowed(self, identity: Identity, action: Action, queue: str | None) -> bool:
        """Whether ``identity`` may do ``action`` on ``queue`` (None for blob actions)."""
        if identity.kind == "user":
            return True
        if identity.kind == "worker":
            if action in (Action.BLOB_READ, Action.BLOB_WRITE):
                return True  # a worker reads its inputs and stores its outputs
            if action is Action.WORK:
                return queue in identity.queues
            # Otherwise a worker credential opens no more, and no less, than none at all.
            return self.allowed(ANONYMOUS, action, queue)
        # Anonymous: only in public mode, never on a private queue, never as a worker.
        if not self.public or action is Action.WORK:
            return False
        if queue is None:
            return action in (Action.BLOB_READ, Action.BLOB_WRITE)
        return not self.is_private(queue)
