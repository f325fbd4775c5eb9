"""The demo settings with async views added, for the ASGI test (tests/test_async.py)."""

from project.settings import *  # noqa: F403

ROOT_URLCONF = "tests.asgi_urls"
