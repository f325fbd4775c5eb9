"""Settings of the Channels comparison: the project's, plus channels and a channel layer.

``BENCH_CHANNEL_LAYER`` chooses the layer: ``redis`` (``channels_redis``'s
``RedisChannelLayer`` at ``BENCH_REDIS_URL``, with its defaults but a larger pool) or ``postgres``
(``channels_postgres`` on the project's own database). ``DEBUG = False`` as in
bench/settings.py.
"""

import importlib.util
import os

from project.settings import *  # noqa: F403
from project.settings import DATABASES, INSTALLED_APPS

DEBUG = False
INSTALLED_APPS = [*INSTALLED_APPS, "channels"]
ASGI_APPLICATION = "bench.channels_site.asgi.application"

if importlib.util.find_spec("channels_postgres") is not None:
    INSTALLED_APPS.append("channels_postgres")
    # channels_postgres reads and deletes group rows through this alias.
    DATABASES = {**DATABASES, "channels_postgres": dict(DATABASES["default"])}

_LAYER = os.environ.get("BENCH_CHANNEL_LAYER", "redis")
_REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
if _LAYER == "postgres":
    # The layer builds a Django DatabaseWrapper from CONFIG: it needs every key Django fills in.
    _database = {"USER": "", "PASSWORD": "", "HOST": "", "PORT": "", "OPTIONS": {}, "TIME_ZONE": None}
    _database.update(DATABASES["default"])
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels_postgres.core.PostgresChannelLayer", "CONFIG": _database}}
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # redis-py 8 caps a pool at 100 connections and then fails instead of waiting (HTTP 500
            # under a burst of logins): an operator would raise the cap, so we do.
            "CONFIG": {"hosts": [{"address": _REDIS_URL, "max_connections": 2000}]},
        }
    }
