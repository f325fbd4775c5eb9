"""Database access from the websocket process, off the event loop.

- ``run_sync(fn, ...)`` runs ORM or session work in the worker's thread pool,
  with ``close_old_connections()`` around it as Django does around a request.
- ``listener_conninfo()`` turns ``DATABASES`` into a libpq string for the
  listener's own psycopg async connections.
- ``EVENT_COLUMNS`` / ``row_to_event()`` read outbox rows in one shape for the
  listener (psycopg async) and for replay (Django cursor in a thread).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any, NamedTuple, ParamSpec, TypeVar

from django.db import DEFAULT_DB_ALIAS, close_old_connections, connections
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from realtime.conf import settings
from realtime.registry import Audience

__all__ = [
    "EVENT_COLUMNS",
    "EVENT_MESSAGE",
    "OutboxEvent",
    "listen_conninfo",
    "listener_conninfo",
    "prepare_threshold",
    "read_events",
    "row_to_event",
    "run_sync",
]

P = ParamSpec("P")
T = TypeVar("T")

# Keys of DATABASES[...]["OPTIONS"] that are Django's or psycopg's, not libpq's.
_NON_LIBPQ_OPTIONS = {
    "isolation_level",
    "server_side_binding",
    "assume_role",
    "pool",
    "cursor_factory",
    "context",
    "prepare_threshold",
}

# The wire message of an event (protocol.encode_event's format), built by
# PostgreSQL from the row: the worker sends it as is, without decoding or
# encoding anything. ``at`` is the publish time in UTC, to the microsecond.
EVENT_MESSAGE = (
    """'{"type":"event","id":' || position"""
    """ || ',"event":' || to_json(name)::text"""
    """ || ',"topic":' || coalesce(to_json(topic)::text, 'null')"""
    """ || ',"data":' || data::text"""
    """ || ',"at":"' || to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US') || '+00:00"}'"""
)
EVENT_COLUMNS = (
    "position, CASE WHEN control THEN name END, CASE WHEN control THEN data::text END,"
    f" CASE WHEN NOT control THEN {EVENT_MESSAGE} END, extract(epoch FROM created_at)::float8,"
    " users, groups, permissions, staff, everyone, topic, staff_only"
)


class OutboxEvent(NamedTuple):
    """A committed outbox row, as the worker routes it (a tuple: built per row, so cheap)."""

    position: int
    # Control events (for the workers, never sent): their name and JSON data.
    control: str | None
    control_data: str | None
    # Other events: the message to send.
    message: str | None
    created: float  # publish time, seconds since the epoch
    audience: Audience


def row_to_event(row: tuple[Any, ...]) -> OutboxEvent:
    """Return the event of a row selected with ``EVENT_COLUMNS``."""
    position, control, control_data, message, created, *audience = row
    return OutboxEvent(position, control, control_data, message, created, Audience(*audience))


async def run_sync(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ``fn(*args, **kwargs)`` in a thread, with Django's connection hygiene."""

    def call() -> T:
        close_old_connections()
        try:
            return fn(*args, **kwargs)
        finally:
            close_old_connections()

    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(call))


def read_events(
    after: int,
    upto: int | None,
    limit: int,
    *,
    audience: tuple[str, dict[str, Any]] | None = None,
    max_bytes: int | None = None,
    using: str = DEFAULT_DB_ALIAS,
) -> list[OutboxEvent]:
    """Return committed, non-control events with ``after < position <= upto``, in order (sync).

    Args:
        limit: at most this many events.
        audience: ``(where, params)``: only rows that match this SQL condition
            (``registry.AUDIENCE_SQL`` for one client), filtered by PostgreSQL.
        max_bytes: stop once the events' data passes this many bytes (the
            first event is always returned), so a batch of large events
            holds a bounded amount of memory.
    """
    where = "position > %(after)s AND NOT control"
    params: dict[str, Any] = {"after": after, "limit": limit}
    if upto is not None:
        where += " AND position <= %(upto)s"
        params["upto"] = upto
    if audience is not None:
        where += f" AND {audience[0]}"
        params.update(audience[1])
    sql = f"SELECT {EVENT_COLUMNS} FROM realtime_event WHERE {where} ORDER BY position LIMIT %(limit)s"
    if max_bytes is not None:
        # A running total over the batch; each row's own size is subtracted so the first row always fits.
        sql = (
            f"SELECT {EVENT_COLUMNS} FROM ("
            "SELECT *, sum(octet_length(data::text)) OVER (ORDER BY position) - octet_length(data::text) AS before"
            f" FROM realtime_event WHERE {where} ORDER BY position LIMIT %(limit)s"
            ") AS batch WHERE before < %(max_bytes)s ORDER BY position"
        )
        params["max_bytes"] = max_bytes
    with connections[using].cursor() as cursor:
        cursor.execute(sql, params)
        return [row_to_event(row) for row in cursor.fetchall()]


def listen_conninfo() -> str:
    """Return the libpq connection string of the listener's LISTEN and reading connections.

    ``REALTIME["LISTEN_DATABASE"]``: a ``DATABASES`` alias, or a libpq
    connection string or URI; by default ``DATABASES["default"]``. LISTEN needs a
    session of its own, so when the default goes through a pooler in
    transaction mode (PgBouncer), point this at the server directly.
    """
    target = settings.LISTEN_DATABASE
    if target is None or target in connections.settings:
        return listener_conninfo(target or DEFAULT_DB_ALIAS)
    params: dict[str, Any] = {"application_name": "realtime-listener", **_KEEPALIVES, **conninfo_to_dict(target)}
    return make_conninfo(**params)


def prepare_threshold(using: str = DEFAULT_DB_ALIAS) -> int | None:
    """psycopg's ``prepare_threshold`` for the worker's own pools: ``OPTIONS["prepare_threshold"]`` if set, else 5.

    Set it to None in ``DATABASES`` when the database is reached through
    PgBouncer before 1.21 in transaction mode, which cannot keep prepared statements.
    """
    options = connections[using].settings_dict.get("OPTIONS") or {}
    return options.get("prepare_threshold", 5)


def listener_conninfo(using: str = DEFAULT_DB_ALIAS, application_name: str = "realtime-listener") -> str:
    """Return a libpq connection string for ``DATABASES[using]``."""
    db = connections[using].settings_dict
    params: dict[str, Any] = {
        "dbname": db.get("NAME") or "postgres",
        "user": db.get("USER") or None,
        "password": db.get("PASSWORD") or None,
        "host": db.get("HOST") or None,
        "port": db.get("PORT") or None,
    }
    for key, value in (db.get("OPTIONS") or {}).items():
        if key not in _NON_LIBPQ_OPTIONS:
            params[key] = value
    params["application_name"] = application_name
    for key, value in _KEEPALIVES.items():
        params.setdefault(key, value)
    return make_conninfo(**{k: v for k, v in params.items() if v is not None})


# Notice a silent network loss in about 10 s (TCP only; ignored on sockets).
_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 4, "keepalives_interval": 2, "keepalives_count": 3}
