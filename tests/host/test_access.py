"""The access policy table of SPEC §8, row by row."""

from __future__ import annotations

import pytest

from jupyter_compute_queue.host.access import (
    ANONYMOUS,
    AccessPolicy,
    Action,
    Identity,
    check_namespace,
    check_queue_name,
    check_worker_token,
    worker_credential,
    worker_identity,
    worker_token,
)

USER = Identity("user", "alice")
WORKER_Q = Identity("worker", queues=frozenset({"q"}))
QUEUE_ACTIONS = [Action.READ, Action.SUBMIT, Action.CANCEL, Action.DELETE]
BLOBS = [Action.BLOB_READ, Action.BLOB_WRITE]
QUEUES = ("q", "local")

# (public mode, identity, action, queue) → allowed
TABLE = [
    *[(False, USER, a, q, True) for a in [*QUEUE_ACTIONS, Action.WORK] for q in ("q", "local")],
    *[(True, USER, a, q, True) for a in [*QUEUE_ACTIONS, Action.WORK] for q in ("q", "local")],
    *[(pub, USER, a, None, True) for pub in (False, True) for a in BLOBS],
    # Private host: anonymous callers get nothing at all.
    *[
        (False, ANONYMOUS, a, q, False)
        for a in [*QUEUE_ACTIONS, Action.WORK]
        for q in ("q", "local")
    ],
    *[(False, ANONYMOUS, a, None, False) for a in BLOBS],
    # Public host: every queue but local is open, blobs too, but never working a queue.
    *[(True, ANONYMOUS, a, "q", True) for a in QUEUE_ACTIONS],
    *[(True, ANONYMOUS, a, "local", False) for a in QUEUE_ACTIONS],
    (True, ANONYMOUS, Action.WORK, "q", False),
    *[(True, ANONYMOUS, a, None, True) for a in BLOBS],
    # A worker token works its one queue and handles blobs; nothing else.
    *[(pub, WORKER_Q, Action.WORK, "q", True) for pub in (False, True)],
    *[(pub, WORKER_Q, Action.WORK, "other", False) for pub in (False, True)],
    *[(False, WORKER_Q, a, "q", False) for a in QUEUE_ACTIONS],
    # In public mode it opens what no credentials open: never less.
    *[(True, WORKER_Q, a, "q", True) for a in QUEUE_ACTIONS],
    *[(True, WORKER_Q, a, "local", False) for a in QUEUE_ACTIONS],
    *[(False, WORKER_Q, a, None, True) for a in BLOBS],
]


@pytest.mark.parametrize(("public", "identity", "action", "queue", "expected"), TABLE)
def test_policy_table(
    public: bool, identity: Identity, action: Action, queue: str | None, expected: bool
) -> None:
    assert AccessPolicy(public=public).allowed(identity, action, queue) is expected


def test_global_lookups() -> None:
    assert AccessPolicy(public=False).may_read_some_queue(USER)
    assert not AccessPolicy(public=False).may_read_some_queue(ANONYMOUS)
    assert not AccessPolicy(public=False).may_read_some_queue(WORKER_Q)
    assert AccessPolicy(public=True).may_read_some_queue(ANONYMOUS)


def test_private_queues() -> None:
    assert AccessPolicy(public=False).is_private("anything")
    assert AccessPolicy(public=True).is_private("local")
    assert not AccessPolicy(public=True).is_private("Local")  # names are case-sensitive


def test_worker_tokens_are_per_queue_and_per_host() -> None:
    token = worker_token(b"secret", "q")
    assert check_worker_token(b"secret", "q", token)
    assert not check_worker_token(b"secret", "r", token)
    assert not check_worker_token(b"other secret", "q", token)


@pytest.mark.parametrize("name", ["q", "Local", "a.b_c-d", "9" * 128])
def test_good_queue_names(name: str) -> None:
    assert check_queue_name(name) == name


@pytest.mark.parametrize("name", ["", "-q", ".q", "a/b", "%2F", "a b", "x" * 129, "é"])
def test_bad_queue_names(name: str) -> None:
    with pytest.raises(ValueError, match="queue name"):
        check_queue_name(name)


@pytest.mark.parametrize("namespace", ["", "*", "a b", "x" * 129, "a/b"])
def test_bad_namespaces(namespace: str) -> None:
    with pytest.raises(ValueError, match="namespace"):
        check_namespace(namespace)


def test_worker_credentials_name_their_queues() -> None:
    secret = b"s3cret"
    both = f"{worker_credential(secret, 'a')},{worker_credential(secret, 'b.c')}"
    identity = worker_identity(secret, both)
    assert identity == Identity("worker", queues=frozenset({"a", "b.c"}))
    assert worker_identity(secret, worker_credential(b"other", "a")) is None
    # A token for one queue cannot be relabelled for another.
    forged = "b:" + worker_credential(secret, "a").split(":")[1]
    assert worker_identity(secret, forged) is None
    assert worker_identity(secret, "not-a-credential") is None
    assert worker_identity(secret, f"{worker_credential(secret, 'a')},junk") is None
