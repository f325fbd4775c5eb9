"""Database access from the websocket process, off the event loop.

- ``run_sync(fn, ...)`` runs ORM or session work in the worker's thread pool,
  with ``close_old_connections()`` around it as Django does around a request.
- ``listener_conninfo()`` turns ``DATABASES`` into a libpq string for the
  worker's own psycopg async connections (listener, logins);
  ``listen_conninfo()`` applies ``REALTIME["LISTEN_DATABASE"]``.
- ``read_alias()`` and ``read_conninfo()`` name the database the worker reads
  the outbox from: ``REALTIME["READ_DATABASE"]``, a streaming replica, or the
  primary when it is None.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from django.db import DEFAULT_DB_ALIAS, close_old_connections, connections
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from realtime.conf import settings

__all__ = ["listen_conninfo", "listener_conninfo", "prepare_threshold", "read_alias", "read_conninfo", "run_sync"]

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


async def run_sync(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ``fn(*args, **kwargs)`` in a thread, with Django's connection hygiene."""

    def call() -> T:
        close_old_connections()
        try:
            return fn(*args, **kwargs)
        finally:
            close_old_connections()

    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(call))


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


def read_alias() -> str:
    """Return the ``DATABASES`` alias client replays read the outbox from: ``READ_DATABASE``, else ``default``."""
    alias: str = settings.READ_DATABASE or DEFAULT_DB_ALIAS
    return alias


def read_conninfo() -> str | None:
    """Return the libpq string of the listener's reading connection on ``READ_DATABASE``; None to read the primary.

    The replica is only read: LISTEN and every write stay on the primary.
    """
    if settings.READ_DATABASE is None:
        return None
    return listener_conninfo(settings.READ_DATABASE)


def prepare_threshold(using: str = DEFAULT_DB_ALIAS) -> int | None:
    """psycopg's ``prepare_threshold`` for the worker's own pools: ``OPTIONS["prepare_threshold"]`` if set, else 5.

    Set it to None in ``DATABASES`` when the database is reached through
    PgBouncer before 1.21 in transaction mode, which cannot keep prepared statements.
    """
    options = connections[using].settings_dict.get("OPTIONS") or {}
    threshold: int | None = options.get("prepare_threshold", 5)
    return threshold


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
