"""System checks of the realtime app (``manage.py check``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings as django_settings
from django.core import checks
from django.db import connections

from realtime.conf import settings

__all__ = [
    "check_admin_template",
    "check_database",
    "check_origins",
    "check_read_database",
    "check_session_engine",
    "check_settings",
    "check_topic_policy",
]

# Cache backends whose entries only the process that wrote them can read.
PER_PROCESS_CACHES = (
    "django.core.cache.backends.locmem.LocMemCache",
    "django.core.cache.backends.dummy.DummyCache",
)
CACHE_SESSION_ENGINES = ("django.contrib.sessions.backends.cache", "django.contrib.sessions.backends.cached_db")


@checks.register()
def check_database(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """realtime.E001: the outbox needs PostgreSQL (LISTEN/NOTIFY, triggers, arrays).

    Not tagged ``database``: the vendor is known without connecting, and
    database-tagged checks run only with ``check --database``.
    """
    vendor = connections["default"].vendor
    if vendor == "postgresql":
        return []
    return [
        checks.Error(
            f"The realtime app needs PostgreSQL, but DATABASES['default'] is {vendor}.",
            hint="Set DATABASES['default']['ENGINE'] to 'django.db.backends.postgresql' "
            "(with psycopg 3 installed); realtime keeps its outbox in the default database.",
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
    if django_settings.SESSION_ENGINE == "django.contrib.sessions.backends.cache":
        alias = getattr(django_settings, "SESSION_CACHE_ALIAS", "default")
        backend = django_settings.CACHES.get(alias, {}).get("BACKEND", "")
        if backend in PER_PROCESS_CACHES:
            return [
                checks.Error(
                    f"SESSION_ENGINE keeps sessions only in the cache {alias!r}, whose backend ({backend}) "
                    "is private to each process: the websocket worker cannot see your users' sessions, "
                    "so every connection would be refused (4401).",
                    hint="Use the 'django.contrib.sessions.backends.db' or '...cached_db' session engine, or "
                    f"point CACHES[{alias!r}] at a shared cache (Redis, Memcached, database).",
                    id="realtime.E005",
                )
            ]
    return []


@checks.register(checks.Tags.templates)
def check_admin_template(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """realtime.W003: the admin's pages load the realtime toasts.

    Follows the chain of ``admin/base_site.html`` templates that extend one
    another, as the template engine would, and looks for realtime's own.
    """
    from django.apps import apps

    if not apps.is_installed("django.contrib.admin"):
        return []
    from django.template import TemplateDoesNotExist, engines
    from django.template.backends.django import DjangoTemplates
    from django.template.loader_tags import ExtendsNode

    ours = str(Path(__file__).resolve().parent / "templates" / "admin" / "base_site.html")
    for engine in engines.all():
        if not isinstance(engine, DjangoTemplates):
            continue
        skip: list[Any] = []
        first = None
        while True:
            try:
                template, origin = engine.engine.find_template("admin/base_site.html", skip=skip)
            except TemplateDoesNotExist:
                break
            first = first or origin.name
            if origin.name == ours or "realtime/admin_toasts.html" in (template.source or ""):
                return []
            extends = [
                node for node in template.nodelist.get_nodes_by_type(ExtendsNode) if isinstance(node, ExtendsNode)
            ]
            parent = getattr(extends[0].parent_name, "var", None) if extends else None
            if parent != "admin/base_site.html":
                break
            skip.append(origin)
        return [
            checks.Warning(
                f"The admin's pages will not show realtime's live toasts: {first or 'admin/base_site.html'} "
                "does not lead to realtime's admin/base_site.html.",
                hint="Put 'realtime' before 'django.contrib.admin' in INSTALLED_APPS. If your own "
                "admin/base_site.html extends 'admin/base.html', make it extend 'admin/base_site.html' "
                'instead, or add {% include "realtime/admin_toasts.html" %} to its extrahead block.',
                id="realtime.W003",
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


@checks.register()
def check_read_database(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """realtime.E006: READ_DATABASE names a PostgreSQL database of ``DATABASES``.

    Not tagged ``database``: whether the alias exists and which engine it has
    is known without connecting (that it is a replica of ``default`` is not:
    the worker cannot tell a replica of another database apart).
    """
    alias = settings.READ_DATABASE
    if alias is None:
        return []
    if alias not in connections.settings:
        known = ", ".join(repr(name) for name in connections.settings) or "none"
        return [
            checks.Error(
                f"REALTIME['READ_DATABASE'] = {alias!r} is not a DATABASES alias (the aliases are: {known}).",
                hint="Add the read-only streaming replica of DATABASES['default'] to DATABASES under this name, "
                "or set REALTIME['READ_DATABASE'] to None to read the outbox from the primary.",
                id="realtime.E006",
            )
        ]
    vendor = connections[alias].vendor
    if vendor != "postgresql":
        return [
            checks.Error(
                f"REALTIME['READ_DATABASE'] = {alias!r} is {vendor}, not PostgreSQL.",
                hint=f"Point DATABASES[{alias!r}] at a streaming replica of DATABASES['default'] "
                "(ENGINE 'django.db.backends.postgresql').",
                id="realtime.E006",
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
