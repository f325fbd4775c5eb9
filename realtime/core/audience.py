"""Who may receive an event: identities, audiences, the outbox event, and the one audience rule.

The rule is stated here once, as :func:`matches` (one client) and as
``AUDIENCE_SQL`` (outbox rows in PostgreSQL, for replay); the worker's registry
indexes clients so that ``Registry.recipients()`` returns exactly the clients
:func:`matches` accepts. ``tests/test_audience_rule.py`` holds the three equal
(Hypothesis). An audience is a union of parts; ``staff_only`` then keeps staff.

No Django and no I/O here: both processes import this module.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = [
    "AUDIENCE_SQL",
    "Audience",
    "ControlEvent",
    "Identity",
    "OutboxEvent",
    "audience_sql_params",
    "digest",
    "matches",
]


def digest(text: str) -> str:
    """Return the SHA-256 hex digest of ``text``: what stands for a session key or a token nonce
    in the database, the outbox and the logs (never the secret itself)."""
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a connection belongs to, and what they may receive."""

    user_id: int
    username: str
    session_hash: str
    is_staff: bool
    is_superuser: bool
    groups: frozenset[str]
    permissions: frozenset[str]
    # Kept in the worker's memory to re-check the session; never logged.
    session_key: str = field(repr=False, default="")

    def has_perm(self, permission: str) -> bool:
        return self.is_superuser or permission in self.permissions


class Audience(NamedTuple):
    """Who may receive an event (the audience columns of an outbox row, in their order)."""

    users: Sequence[int] = ()
    groups: Sequence[str] = ()
    permissions: Sequence[str] = ()
    staff: bool = False
    everyone: bool = False
    topic: str | None = None
    staff_only: bool = False


class OutboxEvent(NamedTuple):
    """A committed event for clients, as the worker routes it (a tuple: built per row, so cheap)."""

    position: int
    message: str  # the wire message, built by PostgreSQL
    created: float  # publish time, seconds since the epoch
    audience: Audience


class ControlEvent(NamedTuple):
    """A committed event for the workers (a logout, a rights change), never sent to a client."""

    position: int
    name: str
    data: dict[str, Any]


def matches(identity: Identity, topics: Iterable[str], audience: Audience) -> bool:
    """Return True if a client with ``identity`` and ``topics`` may receive ``audience``."""
    if audience.staff_only and not identity.is_staff:
        return False
    return (
        audience.everyone
        or identity.user_id in audience.users
        or (audience.staff and identity.is_staff)
        or not identity.groups.isdisjoint(audience.groups)
        or (bool(audience.permissions) and identity.is_superuser)
        or not identity.permissions.isdisjoint(audience.permissions)
        or (audience.topic is not None and audience.topic in topics)
    )


# matches() for outbox rows: a WHERE clause on the audience columns, with
# audience_sql_params() for one client. Never NULL.
AUDIENCE_SQL = (
    "(NOT staff_only OR %(is_staff)s) AND ("
    "everyone"
    " OR %(user_id)s = ANY(users)"
    " OR (staff AND %(is_staff)s)"
    " OR groups && %(groups)s::varchar[]"
    " OR (cardinality(permissions) > 0 AND %(is_superuser)s)"
    " OR permissions && %(permissions)s::varchar[]"
    " OR coalesce(topic = ANY(%(topics)s::varchar[]), false))"
)


def audience_sql_params(identity: Identity, topics: Iterable[str]) -> dict[str, Any]:
    """Return the parameters of ``AUDIENCE_SQL`` for a client with ``identity`` and ``topics``."""
    return {
        "user_id": identity.user_id,
        "is_staff": identity.is_staff,
        "is_superuser": identity.is_superuser,
        "groups": sorted(identity.groups),
        "permissions": sorted(identity.permissions),
        "topics": sorted(topics),
    }
