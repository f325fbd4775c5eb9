"""The demo settings on SQLite: only for checking that realtime.E001 fires."""

from project.settings import *  # noqa: F403

DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
