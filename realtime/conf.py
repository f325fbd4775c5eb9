"""The ``REALTIME`` setting, declared once: each key's default, its rule, and what it means.

``SETTINGS`` is the one table: :class:`Settings` loads and validates from it,
``DEFAULTS`` is derived from it, and ``tests/test_conf.py`` holds the table in
docs/settings.md to it. Read settings through ``realtime.conf.settings`` (an
attribute per key). It is reloaded when Django's ``setting_changed`` signal
fires, so ``override_settings(REALTIME={...})`` works in tests. An invalid
value falls back to its default and is listed in ``settings.errors``, which
system check ``realtime.E002`` reports.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings as django_settings
from django.core.signals import setting_changed

__all__ = ["DEFAULTS", "SETTINGS", "Setting", "settings"]

# A rule checks a value; it returns why the value is refused, or None.
Rule = Callable[[str, Any], str | None]


def positive_int(key: str, value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return f"REALTIME[{key!r}] must be a positive integer, not {value!r}."
    return None


def seconds(key: str, value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        return f"REALTIME[{key!r}] must be a positive number of seconds, not {value!r}."
    return None


def seconds_or_none(key: str, value: Any) -> str | None:
    return None if value is None else seconds(key, value)


def ws_url_or_none(key: str, value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value.startswith(("ws://", "wss://"))):
        return f"REALTIME[{key!r}] must be None or a ws:// or wss:// URL, not {value!r}."
    return None


def origins(key: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple) or not all(o is None or isinstance(o, str) for o in value):
        return f"REALTIME[{key!r}] must be None or a list of origins (str) and None."
    for origin in value:
        if isinstance(origin, str) and origin.startswith("^"):
            try:
                re.compile(origin)
            except re.error as exc:
                return f"REALTIME[{key!r}] pattern {origin!r} is not a regular expression: {exc}."
    return None


def networks(key: str, value: Any) -> str | None:
    try:
        for network in value:
            ipaddress.ip_network(network, strict=False)
    except (TypeError, ValueError):
        return f"REALTIME[{key!r}] must be a list of IP addresses or networks, not {value!r}."
    return None


def compression(key: str, value: Any) -> str | None:
    if value not in (None, "deflate"):
        return f"REALTIME[{key!r}] must be None or 'deflate', not {value!r}."
    return None


def str_or_none(key: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        return f"REALTIME[{key!r}] must be a string or None."
    return None


def boolean(key: str, value: Any) -> str | None:
    if not isinstance(value, bool):
        return f"REALTIME[{key!r}] must be True or False, not {value!r}."
    return None


def topic_patterns(key: str, value: Any) -> str | None:
    if not isinstance(value, list | tuple) or not all(isinstance(p, str) and p for p in value):
        return f"REALTIME[{key!r}] must be a list of topic patterns (non-empty str), not {value!r}."
    return None


def dotted_path_or_none(key: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        return f"REALTIME[{key!r}] must be None or a dotted path to can_subscribe(user, topic)."
    return None


def topic_rules(key: str, value: Any) -> str | None:
    if not isinstance(value, dict):
        return f"REALTIME[{key!r}] must be a dict of pattern -> permission or None."
    return None


def alias_or_none(key: str, value: Any) -> str | None:
    # Whether the alias exists is system check realtime.E006's to say, with a hint.
    if value is not None and (not isinstance(value, str) or not value):
        return f"REALTIME[{key!r}] must be None or a DATABASES alias (a non-empty string), not {value!r}."
    return None


def database_or_none(key: str, value: Any) -> str | None:
    if value is None or (isinstance(value, str) and value in getattr(django_settings, "DATABASES", {})):
        return None
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    if isinstance(value, str) and value:
        try:
            conninfo_to_dict(value)
        except ProgrammingError:
            pass
        else:
            return None
    return f"REALTIME[{key!r}] must be None, a DATABASES alias or a libpq connection string, not {value!r}."


@dataclass(frozen=True)
class Setting:
    """One key of ``REALTIME``: its default, the rule its value must follow, and what it means."""

    default: Any
    rule: Rule
    doc: str


SETTINGS: dict[str, Setting] = {
    "URL": Setting(
        None,
        ws_url_or_none,
        "Public websocket URL returned by the token view; None builds it from the request's host and WS_PORT.",
    ),
    "WS_PORT": Setting(8765, positive_int, "Port of the websocket URL built when URL is None."),
    "TOKEN_MAX_AGE": Setting(60, positive_int, "Lifetime of a connection token, in seconds."),
    "MAX_DATA_SIZE": Setting(1024 * 1024, positive_int, "Largest JSON-encoded publish() data, in UTF-8 bytes."),
    "AUTH_TIMEOUT": Setting(10.0, seconds, "Seconds a client has to authenticate (else 4408)."),
    "MAX_MESSAGE_SIZE": Setting(64 * 1024, positive_int, "Largest inbound message, in bytes (bigger: 1009)."),
    "MAX_BUFFER": Setting(
        4 * 1024 * 1024, positive_int, "Unsent bytes past which a client is too slow and closed with 1013."
    ),
    "MAX_PENDING": Setting(10_000, positive_int, "Live events a client may have queued while its replay runs."),
    "BATCH_SIZE": Setting(500, positive_int, "Events read from the outbox per query (live and replay)."),
    "THREADS": Setting(32, positive_int, "Threads for ORM and session work in the websocket process."),
    "TOPICS": Setting(
        {"*": None}, topic_rules, "fnmatch pattern -> permission needed to subscribe, or None for any user."
    ),
    "TOPIC_POLICY": Setting(None, dotted_path_or_none, "Dotted path to can_subscribe(user, topic), replaces TOPICS."),
    "RETENTION": Setting(24 * 3600, positive_int, "Seconds events are kept for resume; older cursors get reset."),
    "PRUNE_INTERVAL": Setting(60.0, seconds, "Seconds between a worker's pruning runs (x 0.5 to 1.5)."),
    "PING_INTERVAL": Setting(10.0, seconds_or_none, "Seconds between keepalive pings (None: no pings)."),
    "PING_TIMEOUT": Setting(15.0, seconds_or_none, "Seconds to wait for a pong before closing (None: forever)."),
    "CLOSE_TIMEOUT": Setting(5.0, seconds, "Seconds to wait for the closing handshake."),
    "ALLOWED_ORIGINS": Setting(
        None, origins, "Origins allowed to connect: None derives them from ALLOWED_HOSTS and CSRF_TRUSTED_ORIGINS."
    ),
    "MESSAGE_BURST": Setting(20, positive_int, "Client messages allowed in a burst after welcome."),
    "MESSAGES_PER_MINUTE": Setting(100, positive_int, "Client messages allowed per minute, sustained."),
    "AUTH_FAILURES_PER_MINUTE": Setting(
        30, positive_int, "Failed logins that cost a query allowed per client address per minute."
    ),
    "MAX_CONNECTIONS_PER_USER": Setting(20, positive_int, "Connections one user may have on one worker."),
    "MAX_CONNECTIONS": Setting(50_000, positive_int, "Open connections per worker (lowered to the open-files limit)."),
    "REVALIDATE_INTERVAL": Setting(60.0, seconds, "Seconds between re-checks of every open session."),
    "TRUSTED_PROXIES": Setting([], networks, "Reverse proxies whose X-Forwarded-For is believed."),
    "COMPRESSION": Setting(None, compression, "permessage-deflate: None (off) or 'deflate'."),
    "SERVER_HEADER": Setting("realtime", str_or_none, "Server header on the websocket port (None: no header)."),
    "PRESENCE_INTERVAL": Setting(2.0, seconds, "Seconds between a worker's presence writes."),
    "LISTEN_DATABASE": Setting(
        None, database_or_none, "Database to LISTEN on: None (default), a DATABASES alias or a connection string."
    ),
    "READ_DATABASE": Setting(
        None, alias_or_none, "DATABASES alias of a streaming replica the workers read the outbox from (None: primary)."
    ),
    "READ_MAX_LAG": Setting(5.0, seconds, "Seconds of replica lag past which /readyz answers 503."),
    "PRESENCE_TOPICS": Setting([], topic_patterns, "Topic patterns whose subscribers get presence.join/leave."),
    "MODEL_CHANGES": Setting(
        True, boolean, "Publish model.change events for tracked models and the admin's live change forms."
    ),
}
DEFAULTS: dict[str, Any] = {key: setting.default for key, setting in SETTINGS.items()}


class Settings:
    """Attribute access to the merged REALTIME settings."""

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}
        self.errors: list[str] = []
        self.explicit: frozenset[str] = frozenset()
        self.load()

    def load(self) -> None:
        """Read ``settings.REALTIME`` over the defaults, key by key through its rule."""
        self.errors = []
        user = getattr(django_settings, "REALTIME", None) or {}
        if not isinstance(user, dict):
            self.errors.append("REALTIME must be a dict.")
            user = {}
        # Keys the site set itself: a limit it chose deserves a warning when it cannot be met.
        self.explicit = frozenset(key for key in user if key in SETTINGS)
        for key in sorted(set(user) - set(SETTINGS)):
            self.errors.append(f"Unknown REALTIME setting {key!r}.")
        values = {}
        for key, setting in SETTINGS.items():
            value = user.get(key, setting.default)
            refusal = setting.rule(key, value) if key in user else None
            if refusal is not None:
                self.errors.append(refusal)
                value = setting.default
            values[key] = value
        self._values = values

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"Unknown REALTIME setting: {name}") from None


settings = Settings()


def _reload(*, setting: str, **kwargs: Any) -> None:
    if setting == "REALTIME":
        settings.load()


setting_changed.connect(_reload)
