"""The ``REALTIME`` setting: defaults, loading and reloading.

Read settings through ``realtime.conf.settings`` (an attribute per key, upper
case). It is reloaded when Django's ``setting_changed`` signal fires, so
``override_settings(REALTIME={...})`` works in tests.
"""

from __future__ import annotations

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
    # Events are kept this many seconds for resume; older ones are pruned and
    # a client whose cursor is older receives {"type": "reset"}.
    "RETENTION": 24 * 3600,
    # Each worker prunes expired events about this often, in seconds.
    "PRUNE_INTERVAL": 60.0,
    # Keepalive pings from the server, in seconds (None disables them).
    "PING_INTERVAL": 20.0,
    "PING_TIMEOUT": 20.0,
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
)
_SECONDS = ("AUTH_TIMEOUT", "PING_INTERVAL", "PING_TIMEOUT", "PRUNE_INTERVAL")


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
        if not isinstance(values["TOPICS"], dict):
            self.errors.append("REALTIME['TOPICS'] must be a dict of pattern -> permission or None.")
            values["TOPICS"] = DEFAULTS["TOPICS"]
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
