"""The REALTIME settings table: one declaration drives loading, validation and the documentation."""

from __future__ import annotations

import ast
import re

import pytest
from django.test import override_settings

from realtime.conf import DEFAULTS, SETTINGS, settings
from tests.helpers import BASE_DIR


def documented_defaults() -> dict[str, object]:
    rows = re.findall(r"^\| `([A-Z_]+)` \| `([^`]*)` \|", (BASE_DIR / "docs" / "settings.md").read_text(), re.M)
    return {key: ast.literal_eval(default) for key, default in rows}


def test_docs_table_lists_every_setting_with_its_default():
    """docs/settings.md has a row for each key of SETTINGS, and no other, with the same default."""
    assert documented_defaults() == DEFAULTS


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("TOKEN_MAX_AGE", True),
        ("TOKEN_MAX_AGE", "60"),
        ("TOKEN_MAX_AGE", 0),
        ("AUTH_TIMEOUT", -1),
        ("CLOSE_TIMEOUT", None),
        ("URL", "http://example.com/"),
        ("ALLOWED_ORIGINS", "https://example.com"),
        ("ALLOWED_ORIGINS", ["^(unclosed"]),
        ("TRUSTED_PROXIES", ["not an address"]),
        ("COMPRESSION", "gzip"),
        ("SERVER_HEADER", 1),
        ("PRESENCE_TOPICS", [""]),
        ("TOPIC_POLICY", 1),
        ("TOPICS", ["*"]),
        ("LISTEN_DATABASE", "nope nope"),
    ],
)
def test_a_refused_value_falls_back_to_the_default_with_an_error(key, value):
    """Each rule refuses what it must; the key keeps its default and E002 names it."""
    with override_settings(REALTIME={key: value}):
        assert getattr(settings, key) == DEFAULTS[key]
        (error,) = settings.errors
        assert error.startswith(f"REALTIME[{key!r}]")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("PING_INTERVAL", None),
        ("PING_TIMEOUT", 2.5),
        ("URL", "wss://example.com/ws/"),
        ("ALLOWED_ORIGINS", [None, "https://example.com", r"^https://(\w+\.)?example\.com$"]),
        ("TRUSTED_PROXIES", ["10.0.0.0/8", "::1"]),
        ("LISTEN_DATABASE", "default"),
        ("LISTEN_DATABASE", "host=/var/run/postgresql dbname=app"),
        ("LISTEN_DATABASE", "postgresql://app@db/app"),
    ],
)
def test_an_accepted_value_is_used(key, value):
    """Values within each rule load as given, and the key counts as set by the site."""
    with override_settings(REALTIME={key: value}):
        assert settings.errors == []
        assert getattr(settings, key) == value
        assert key in settings.explicit


def test_every_setting_has_a_rule_and_a_meaning():
    """Each declared key documents itself in the table (what docs/settings.md expands on)."""
    for key, setting in SETTINGS.items():
        assert setting.doc.strip(), key
        assert setting.rule(key, setting.default) is None, f"{key}'s default breaks its own rule"
