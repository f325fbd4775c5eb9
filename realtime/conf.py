"""The ``REALTIME`` setting: defaults, loading and reloading.

Read settings through ``realtime.conf.settings`` (an attribute per key, upper
case). It is reloaded when Django's ``setting_changed`` signal fires, so
``override_settings(REALTIME={...})`` works in tests.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from django.conf import settings as django_settings
from django.core.signals import setting_changed

__all__ = ["DEFAULTS", "settings"]

DEFAULTS: dict[str, Any] = {
    # Public websocket URL returned by the token view. None builds it from the
    # request's host name and WS_PORT (ws:// or wss:// after the request).
    "URL": None,
    "WS_PORT": 8765,
    # Lifetime of a connection token, in seconds.
    "TOKEN_MAX_AGE": 60,
    # Largest JSON-encoded ``data`` accepted by publish(), in bytes.
    "MAX_DATA_SIZE": 1024 * 1024,
    # Seconds a client has to send its first (authentication) message.
    "AUTH_TIMEOUT": 10.0,
    # Largest inbound message from a client, in bytes (bigger: close 1009).
    "MAX_MESSAGE_SIZE": 64 * 1024,
    # A client whose unsent data passes this many bytes is too slow: it is
    # closed with 1013 so that it cannot hold memory or slow anyone else.
    "MAX_BUFFER": 4 * 1024 * 1024,
    # Events a reconnecting client may have queued while its replay runs.
    "MAX_PENDING": 10_000,
    # Events read from the outbox per query (live and replay).
    "BATCH_SIZE": 500,
    # Threads for ORM and session work in the websocket process.
    "THREADS": 32,
    # Topic policy: fnmatch pattern -> permission required to subscribe
    # ("app_label.codename"), or None for any authenticated user.
    "TOPICS": {"*": None},
    # Or a dotted path to can_subscribe(user, topic) -> bool, which then
    # decides instead of TOPICS (run in a thread: it may use the ORM).
    "TOPIC_POLICY": None,
    # Events are kept this many seconds for resume; older ones are pruned and
    # a client whose cursor is older receives {"type": "reset"}.
    "RETENTION": 24 * 3600,
    # Each worker prunes expired events about this often, in seconds.
    "PRUNE_INTERVAL": 60.0,
    # Keepalive pings from the server, in seconds (None disables them), and the
    # wait for the closing handshake: a half-open connection is gone within
    # PING_INTERVAL + PING_TIMEOUT + CLOSE_TIMEOUT (30 s by default).
    "PING_INTERVAL": 10.0,
    "PING_TIMEOUT": 15.0,
    "CLOSE_TIMEOUT": 5.0,
    # Origins allowed to open a websocket. None derives them from ALLOWED_HOSTS
    # and CSRF_TRUSTED_ORIGINS; otherwise a list of exact origins, regular
    # expressions (strings starting with "^"), and None to accept clients that
    # send no Origin (scripts, not browsers).
    "ALLOWED_ORIGINS": None,
    # Messages a client may send after authenticating: bursts of MESSAGE_BURST,
    # MESSAGES_PER_MINUTE sustained. Faster: closed with 1008.
    "MESSAGE_BURST": 20,
    "MESSAGES_PER_MINUTE": 100,
    # Failed authentications allowed per client address per minute (bursts of as
    # many); past it the address is answered 1013 without a database query.
    "AUTH_FAILURES_PER_MINUTE": 30,
    # Connections per user per worker, and per worker in all (more: 1013 / HTTP 503).
    "MAX_CONNECTIONS_PER_USER": 20,
    "MAX_CONNECTIONS": 50_000,
    # Open connections are re-checked against their session this often (s):
    # a session deleted by any means closes its sockets with 4401.
    "REVALIDATE_INTERVAL": 60.0,
    # Addresses (or networks) of reverse proxies whose X-Forwarded-For is believed.
    "TRUSTED_PROXIES": [],
    # permessage-deflate: None (off) or "deflate". Off by default: it costs about
    # 64 KiB per connection instead of 14 KiB, and broadcast() must compress each
    # recipient's copy separately; events are small JSON on fast links.
    "COMPRESSION": None,
    # The Server header of HTTP responses on the websocket port (None: no header).
    "SERVER_HEADER": "realtime",
    # Each worker writes its heartbeat and its connections' presence this
    # often, in seconds; a worker silent for 3 intervals + 2 s counts as dead.
    "PRESENCE_INTERVAL": 2.0,
    # The database the workers LISTEN on (and read the outbox from): None for
    # DATABASES["default"], a DATABASES alias, or a libpq connection string or
    # URI. Set it when "default" goes through a pooler in transaction mode.
    "LISTEN_DATABASE": None,
    # Topics (fnmatch patterns) whose subscribers receive presence.join and
    # presence.leave events when a user's first / last connection comes and goes.
    "PRESENCE_TOPICS": [],
}


_POSITIVE_INTS = (
    "RETENTION",
    "WS_PORT",
    "TOKEN_MAX_AGE",
    "MAX_DATA_SIZE",
    "MAX_MESSAGE_SIZE",
    "MAX_PENDING",
    "MAX_BUFFER",
    "BATCH_SIZE",
    "THREADS",
    "MESSAGE_BURST",
    "MESSAGES_PER_MINUTE",
    "AUTH_FAILURES_PER_MINUTE",
    "MAX_CONNECTIONS_PER_USER",
    "MAX_CONNECTIONS",
)
_SECONDS = (
    "AUTH_TIMEOUT",
    "CLOSE_TIMEOUT",
    "PING_INTERVAL",
    "PING_TIMEOUT",
    "PRUNE_INTERVAL",
    "REVALIDATE_INTERVAL",
    "PRESENCE_INTERVAL",
)


class Settings:
    """Attribute access to the merged REALTIME settings."""

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}
        self.load()

    def load(self) -> None:
        """Read ``settings.REALTIME`` over DEFAULTS.

        Invalid values fall back to their default and are listed in
        ``errors``, which the ``realtime.E002`` system check reports.
        """
        self.errors: list[str] = []
        user = getattr(django_settings, "REALTIME", None) or {}
        if not isinstance(user, dict):
            self.errors.append("REALTIME must be a dict.")
            user = {}
        # Keys the site set itself: a limit it chose deserves a warning when it cannot be met.
        self.explicit = frozenset(key for key in user if key in DEFAULTS)
        for key in sorted(set(user) - set(DEFAULTS)):
            self.errors.append(f"Unknown REALTIME setting {key!r}.")
        values = {**DEFAULTS, **{k: v for k, v in user.items() if k in DEFAULTS}}
        for key in _POSITIVE_INTS:
            if isinstance(values[key], bool) or not isinstance(values[key], int) or values[key] <= 0:
                self.errors.append(f"REALTIME[{key!r}] must be a positive integer, not {values[key]!r}.")
                values[key] = DEFAULTS[key]
        for key in _SECONDS:
            value = values[key]
            if value is None and key in ("PING_INTERVAL", "PING_TIMEOUT"):
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                self.errors.append(f"REALTIME[{key!r}] must be a positive number of seconds, not {value!r}.")
                values[key] = DEFAULTS[key]
        origins = values["ALLOWED_ORIGINS"]
        if origins is not None and (
            not isinstance(origins, list | tuple) or not all(o is None or isinstance(o, str) for o in origins)
        ):
            self.errors.append("REALTIME['ALLOWED_ORIGINS'] must be None or a list of origins (str) and None.")
            values["ALLOWED_ORIGINS"] = DEFAULTS["ALLOWED_ORIGINS"]
        for origin in values["ALLOWED_ORIGINS"] or ():
            if isinstance(origin, str) and origin.startswith("^"):
                try:
                    re.compile(origin)
                except re.error as exc:
                    self.errors.append(
                        f"REALTIME['ALLOWED_ORIGINS'] pattern {origin!r} is not a regular expression: {exc}."
                    )
                    values["ALLOWED_ORIGINS"] = DEFAULTS["ALLOWED_ORIGINS"]
                    break
        if values["URL"] is not None and (
            not isinstance(values["URL"], str) or not values["URL"].startswith(("ws://", "wss://"))
        ):
            self.errors.append(f"REALTIME['URL'] must be None or a ws:// or wss:// URL, not {values['URL']!r}.")
            values["URL"] = None
        proxies = values["TRUSTED_PROXIES"]
        try:
            for proxy in proxies:
                ipaddress.ip_network(proxy, strict=False)
        except (TypeError, ValueError):
            self.errors.append(
                f"REALTIME['TRUSTED_PROXIES'] must be a list of IP addresses or networks, not {proxies!r}."
            )
            values["TRUSTED_PROXIES"] = []
        if values["COMPRESSION"] not in (None, "deflate"):
            self.errors.append(f"REALTIME['COMPRESSION'] must be None or 'deflate', not {values['COMPRESSION']!r}.")
            values["COMPRESSION"] = None
        if values["SERVER_HEADER"] is not None and not isinstance(values["SERVER_HEADER"], str):
            self.errors.append("REALTIME['SERVER_HEADER'] must be a string or None.")
            values["SERVER_HEADER"] = DEFAULTS["SERVER_HEADER"]
        patterns = values["PRESENCE_TOPICS"]
        if not isinstance(patterns, list | tuple) or not all(isinstance(p, str) and p for p in patterns):
            self.errors.append(
                f"REALTIME['PRESENCE_TOPICS'] must be a list of topic patterns (non-empty str), not {patterns!r}."
            )
            values["PRESENCE_TOPICS"] = DEFAULTS["PRESENCE_TOPICS"]
        if values["TOPIC_POLICY"] is not None and not isinstance(values["TOPIC_POLICY"], str):
            self.errors.append("REALTIME['TOPIC_POLICY'] must be None or a dotted path to can_subscribe(user, topic).")
            values["TOPIC_POLICY"] = None
        target = values["LISTEN_DATABASE"]
        if target is not None and not _is_database(target):
            self.errors.append(
                f"REALTIME['LISTEN_DATABASE'] must be None, a DATABASES alias or a libpq connection string, "
                f"not {target!r}."
            )
            values["LISTEN_DATABASE"] = None
        if not isinstance(values["TOPICS"], dict):
            self.errors.append("REALTIME['TOPICS'] must be a dict of pattern -> permission or None.")
            values["TOPICS"] = DEFAULTS["TOPICS"]
        self._values = values

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"Unknown REALTIME setting: {name}") from None


def _is_database(target: object) -> bool:
    if not isinstance(target, str) or not target:
        return False
    if target in getattr(django_settings, "DATABASES", {}):
        return True
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(target)
    except ProgrammingError:
        return False
    return True


settings = Settings()


def _reload(*, setting: str, **kwargs: Any) -> None:
    if setting == "REALTIME":
        settings.load()


setting_changed.connect(_reload)
