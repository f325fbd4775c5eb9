"""The demo settings without a LOGGING entry for realtime, as a new site has none."""

from project.settings import *  # noqa: F403

LOGGING = {"version": 1, "disable_existing_loggers": False}
