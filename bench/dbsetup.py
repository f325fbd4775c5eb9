"""The database side of the benchmark; runs in the coordinator process.

The full run (``make bench``) uses a database of its own, ``realtime_bench``,
which it creates on the project's PostgreSQL server (the embedded one, or the
server named by ``DATABASE_URL``) and migrates; the development database is
never touched. The bench users (``bench-00000`` ...) are created once and kept
(idempotent); their sessions, the connection tickets and every event are
deleted at the start and at the end of each run. The smoke test passes
pytest-django's test database instead, which pytest flushes afterwards.
"""

from __future__ import annotations

import os
import secrets
import string
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict, make_conninfo

__all__ = [
    "BENCH_DATABASE",
    "BenchUser",
    "bench_database_url",
    "clear_run_data",
    "configure_django",
    "current_database_url",
    "mint_tokens",
    "prepare_users",
    "server_version",
]

BASE_DIR = Path(__file__).resolve().parent.parent
BENCH_DATABASE = "realtime_bench"
USER_PREFIX = "bench-"
SESSION_PREFIX = "bnch"


@dataclass(frozen=True)
class BenchUser:
    """A bench user with one live session (its key is the ``sessionid`` cookie for Channels)."""

    id: int
    session_key: str


def bench_database_url(name: str = BENCH_DATABASE) -> str:
    """Return a libpq string for database ``name`` on the project's server, creating the database if missing."""
    import psycopg

    if os.environ.get("DATABASE_URL"):
        server = os.environ["DATABASE_URL"]
    else:
        from project.database import embedded_uri

        server = embedded_uri(BASE_DIR)
    params = {k: v for k, v in conninfo_to_dict(server).items() if v not in (None, "")}
    with psycopg.connect(make_conninfo(**params), autocommit=True) as connection:
        exists = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if not exists:
            connection.execute(f'CREATE DATABASE "{name}"')
    return make_conninfo(**{**params, "dbname": name})


def configure_django(database_url: str, settings_module: str = "bench.settings") -> None:
    """Point this process's Django at ``database_url`` with ``settings_module`` and set it up."""
    import django

    os.environ["DATABASE_URL"] = database_url
    os.environ["DJANGO_SETTINGS_MODULE"] = settings_module
    django.setup()


def current_database_url() -> str:
    """Return a libpq string for the database Django uses in this process (e.g. a test database)."""
    from realtime.worker.db import listener_conninfo  # reads settings: import once Django is set up

    return listener_conninfo(application_name="realtime-bench")


def server_version() -> str:
    """Return the PostgreSQL server version string."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        return str(cursor.fetchone()[0])


def migrate() -> None:
    """Apply the project's migrations to the current database."""
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


def prepare_users(count: int) -> list[BenchUser]:
    """Ensure ``count`` bench users exist (created once, kept) and give each one fresh session.

    Returns them in a stable order. Old bench sessions are deleted first.
    """
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model
    from django.contrib.auth.hashers import make_password
    from django.contrib.sessions.backends.db import SessionStore
    from django.contrib.sessions.models import Session
    from django.db import transaction
    from django.utils import timezone

    User = get_user_model()
    names = [f"{USER_PREFIX}{i:05d}" for i in range(count)]
    with transaction.atomic():
        existing = set(User.objects.filter(username__in=names).values_list("username", flat=True))
        missing = [name for name in names if name not in existing]
        if missing:
            password = make_password("bench")  # hashed once: bench users never log in with it
            User.objects.bulk_create([User(username=name, password=password) for name in missing], batch_size=2000)
        users = {u.username: u for u in User.objects.filter(username__in=names).only("id", "username", "password")}
        Session.objects.filter(session_key__startswith=SESSION_PREFIX).delete()
        store = SessionStore()
        expires = timezone.now() + timedelta(days=1)
        alphabet = string.ascii_lowercase + string.digits
        rows, result = [], []
        for name in names:
            user = users[name]
            key = SESSION_PREFIX + "".join(secrets.choice(alphabet) for _ in range(28))
            data = {
                SESSION_KEY: str(user.pk),
                BACKEND_SESSION_KEY: "django.contrib.auth.backends.ModelBackend",
                HASH_SESSION_KEY: user.get_session_auth_hash(),
            }
            rows.append(Session(session_key=key, session_data=store.encode(data), expire_date=expires))
            result.append(BenchUser(user.pk, key))
        Session.objects.bulk_create(rows, batch_size=2000)
    return result


def mint_tokens(owners: list[BenchUser], lifetime: float) -> list[str]:
    """Return one connection token per item of ``owners``, minted in bulk.

    Equivalent to ``realtime.tokens.mint(user, session_key)`` for each (same
    signed payload, same salt, one ticket row each), but with one bulk insert
    instead of two queries per token: the benchmark measures the websocket
    server's side of a login, not the token view.
    """
    import hashlib

    from django.core import signing
    from django.utils import timezone

    from realtime.models import Ticket
    from realtime.tokens import SALT

    expires = timezone.now() + timedelta(seconds=lifetime)
    tokens, tickets = [], []
    for owner in owners:
        nonce = secrets.token_urlsafe(18)
        tickets.append(
            Ticket(
                nonce_hash=hashlib.sha256(nonce.encode()).hexdigest(),
                session_key=owner.session_key,
                user_id=owner.id,
                expires_at=expires,
            )
        )
        tokens.append(signing.dumps({"u": owner.id, "n": nonce}, salt=SALT))
    Ticket.objects.bulk_create(tickets, batch_size=5000)
    return tokens


def clear_run_data(*, events: bool = True) -> None:
    """Delete what a run leaves behind: bench sessions' tickets, presence rows and (``events``) all events.

    Only for databases the benchmark owns (or a test database): it truncates
    the outbox and presence tables, and the channels_postgres tables if present.
    """
    from django.db import connection

    tables = ["realtime_ticket", "realtime_presence_subscription", "realtime_presence_connection"]
    tables.append("realtime_presence_worker")
    if events:
        tables.append("realtime_event")
    existing = set(connection.introspection.table_names())
    tables += [t for t in ("channels_postgres_message", "channels_postgres_groupchannel") if t in existing]
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE " + ", ".join(t for t in tables if t in existing))
