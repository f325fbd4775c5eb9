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
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ParamSpec, TypeVar

from django.db import DEFAULT_DB_ALIAS, close_old_connections, connections
from psycopg.conninfo import make_conninfo

from realtime.registry import Audience

__all__ = ["EVENT_COLUMNS", "OutboxEvent", "listener_conninfo", "read_events", "row_to_event", "run_sync"]

P = ParamSpec("P")
T = TypeVar("T")

# Keys of DATABASES[...]["OPTIONS"] that are Django's, not libpq's.
_NON_LIBPQ_OPTIONS = {"isolation_level", "server_side_binding", "assume_role", "pool", "cursor_factory", "context"}

EVENT_COLUMNS = (
    "position, name, topic, data::text, created_at, users, groups, permissions, staff, everyone, staff_only, control"
)


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """A committed outbox row, as the worker routes it."""

    position: int
    name: str
    topic: str | None
    data_json: str
    at: str
    created: float  # publish time, seconds since the epoch
    audience: Audience
    control: bool


def row_to_event(row: tuple[Any, ...]) -> OutboxEvent:
    position, name, topic, data_json, created_at, users, groups, permissions, staff, everyone, staff_only, control = row
    # In UTC whichever connection read it (the listener's uses the server's time zone).
    at = created_at.astimezone(UTC).isoformat() if isinstance(created_at, datetime) else str(created_at)
    return OutboxEvent(
        position=position,
        name=name,
        topic=topic,
        data_json=data_json,
        at=at,
        created=created_at.timestamp() if isinstance(created_at, datetime) else 0.0,
        audience=Audience(
            users=tuple(users),
            groups=tuple(groups),
            permissions=tuple(permissions),
            staff=staff,
            everyone=everyone,
            topic=topic,
            staff_only=staff_only,
        ),
        control=control,
    )


async def run_sync(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ``fn(*args, **kwargs)`` in a thread, with Django's connection hygiene."""

    def call() -> T:
        close_old_connections()
        try:
            return fn(*args, **kwargs)
        finally:
            close_old_connections()

    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(call))


def read_events(after: int, upto: int | None, limit: int, *, using: str = DEFAULT_DB_ALIAS) -> list[OutboxEvent]:
    """Return committed, non-control events with ``after < position <= upto``, in order (sync)."""
    sql = f"SELECT {EVENT_COLUMNS} FROM realtime_event WHERE position > %s AND NOT control"
    params: list[Any] = [after]
    if upto is not None:
        sql += " AND position <= %s"
        params.append(upto)
    sql += " ORDER BY position LIMIT %s"
    params.append(limit)
    with connections[using].cursor() as cursor:
        cursor.execute(sql, params)
        return [row_to_event(row) for row in cursor.fetchall()]


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
    # Notice a silent network loss in about 10 s (TCP only; ignored on sockets).
    params.setdefault("keepalives", 1)
    params.setdefault("keepalives_idle", 4)
    params.setdefault("keepalives_interval", 2)
    params.setdefault("keepalives_count", 3)
    return make_conninfo(**{k: v for k, v in params.items() if v is not None})
