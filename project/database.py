"""Where the project's PostgreSQL database is.

``DATABASE_URL`` (a ``postgresql://`` URI or a libpq ``key=value`` string) wins
when it is set. Otherwise an embedded PostgreSQL from the ``pgserver`` package
is started in ``.pgdata/`` (or ``REALTIME_PGDATA``) and left running, so that
``manage.py shell`` in another terminal reaches the same database while
``make run`` is up. Stop it with ``make pg-stop``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from psycopg import ProgrammingError
from psycopg.conninfo import conninfo_to_dict

__all__ = ["database_settings", "embedded_uri", "is_embedded"]

# Database connections each process may hold (web server process, websocket worker's ORM work).
POOL_SIZE = int(os.environ.get("DJANGO_DB_POOL_SIZE", "10"))

# Keys that map to Django's own DATABASES entries; the rest go to OPTIONS.
_DJANGO_KEYS = {"dbname": "NAME", "user": "USER", "password": "PASSWORD", "host": "HOST", "port": "PORT"}


def is_embedded() -> bool:
    """Return True when no ``DATABASE_URL`` is set and pgserver is used."""
    return not os.environ.get("DATABASE_URL")


def embedded_uri(base_dir: Path) -> str:
    """Start (or find) the embedded PostgreSQL and return its libpq URI.

    The server is started with ``cleanup_mode=None``: it outlives this process,
    and the next call finds it through ``postmaster.pid`` in a fraction of a
    second.
    """
    pgdata = Path(os.environ.get("REALTIME_PGDATA") or base_dir / ".pgdata")
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset, as in most shells
        # started as root or in CI; the fallback it picks works here.
        warnings.simplefilter("ignore")
        import pgserver

        server = pgserver.get_server(pgdata, cleanup_mode=None)
    return server.get_uri()


def database_settings(base_dir: Path) -> dict[str, Any]:
    """Return Django's ``DATABASES["default"]`` for this environment."""
    url = os.environ.get("DATABASE_URL") or embedded_uri(base_dir)
    scheme = url.split("://", 1)[0] if "://" in url else None
    if scheme not in (None, "postgres", "postgresql"):
        raise ImproperlyConfigured(f"DATABASE_URL must name a PostgreSQL server (postgresql://...), not {scheme}://.")
    try:
        params = conninfo_to_dict(url)
    except ProgrammingError as exc:
        raise ImproperlyConfigured(f"DATABASE_URL is not a valid libpq URI: {exc}") from None
    config: dict[str, Any] = {"ENGINE": "django.db.backends.postgresql", "OPTIONS": {}}
    for key, value in params.items():
        if key in _DJANGO_KEYS:
            config[_DJANGO_KEYS[key]] = value
        else:
            config["OPTIONS"][key] = value
    config.setdefault("NAME", "postgres")
    if os.environ.get("DJANGO_TEST_DB_NAME"):
        # Two test runs on one server need two test databases.
        config["TEST"] = {"NAME": os.environ["DJANGO_TEST_DB_NAME"]}
    # Django's connection pool (psycopg_pool): each process holds at most POOL_SIZE connections,
    # however many threads it runs (runserver starts one per HTTP connection; the websocket
    # worker has REALTIME["THREADS"]). A request borrows one and gives it back at its end.
    # max_idle: a connection idle for a minute is closed (psycopg_pool's default keeps it ten minutes),
    # so a burst of replays in the websocket worker does not hold THREADS sessions long after it.
    config["OPTIONS"]["pool"] = {"min_size": 1, "max_size": POOL_SIZE, "timeout": 10, "max_idle": 60}
    config["CONN_MAX_AGE"] = 0  # the pool keeps the connections; Django refuses both at once
    # With a pool, Django checks each connection as it leaves the pool: one that died while
    # idle (PostgreSQL restarted) is replaced, not handed out.
    config["CONN_HEALTH_CHECKS"] = True
    return config
