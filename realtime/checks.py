"""System checks of the realtime app (``manage.py check``)."""

from __future__ import annotations

from typing import Any

from django.conf import settings as django_settings
from django.core import checks
from django.db import connections

from realtime.conf import settings

__all__ = ["check_database", "check_origins", "check_session_engine", "check_settings", "check_topic_policy"]


@checks.register(checks.Tags.database, deploy=False)
def check_database(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """realtime.E001: the outbox needs PostgreSQL (LISTEN/NOTIFY, triggers, arrays)."""
    vendor = connections["default"].vendor
    if vendor == "postgresql":
        return []
    return [
        checks.Error(
            f"The realtime app needs PostgreSQL, but the default database is {vendor}.",
            hint="Set DATABASES['default']['ENGINE'] to 'django.db.backends.postgresql' "
            "(or set DATABASE_URL=postgresql://... for this project).",
            id="realtime.E001",
        )
    ]


@checks.register()
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """realtime.E002: every REALTIME setting is known and well-typed."""
    return [
        checks.Error(message, hint="See docs/settings.md for the REALTIME settings.", id="realtime.E002")
        for message in settings.errors
    ]


@checks.register()
def check_session_engine(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """realtime.E003: tokens are bound to server-side sessions."""
    if django_settings.SESSION_ENGINE == "django.contrib.sessions.backends.signed_cookies":
        return [
            checks.Error(
                "Realtime tokens are bound to server-side sessions, but SESSION_ENGINE stores "
                "sessions in signed cookies: the websocket worker cannot verify them.",
                hint="Use the db, cache or cached_db session engine.",
                id="realtime.E003",
            )
        ]
    return []


@checks.register()
def check_topic_policy(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """realtime.E004: TOPIC_POLICY names an importable callable."""
    from realtime.topics import load_policy

    path = settings.TOPIC_POLICY
    if path is None:
        return []
    try:
        load_policy(path)
    except (ImportError, TypeError) as exc:
        return [
            checks.Error(
                f"REALTIME['TOPIC_POLICY'] = {path!r} cannot be used: {exc}.",
                hint="Point it at a function can_subscribe(user, topic) -> bool, e.g. 'myapp.realtime.can_subscribe'.",
                id="realtime.E004",
            )
        ]
    return []


@checks.register(deploy=True)
def check_origins(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """realtime.W002 (deploy): an Origin allow-list can be derived."""
    if settings.ALLOWED_ORIGINS is None and "*" in django_settings.ALLOWED_HOSTS:
        return [
            checks.Warning(
                "ALLOWED_HOSTS contains '*', so the websocket worker accepts every Origin "
                "(no defence against cross-site websocket hijacking besides the token).",
                hint="Set REALTIME['ALLOWED_ORIGINS'] to your site's origins, e.g. ['https://example.com'].",
                id="realtime.W002",
            )
        ]
    return []
