"""Worker settings with persistent Django connections and no connection pool.

``CONN_MAX_AGE = None`` and no ``OPTIONS["pool"]``: each thread of the worker
keeps a connection of its own, as many sites run Django. ``REALTIME_TEST_APPLICATION_NAME``
names the threads' connections in ``pg_stat_activity`` (the listener and the
login pool name theirs).
"""

import os

from tests.worker_settings import *  # noqa: F403  (with REALTIME_TEST_OVERRIDES)
from tests.worker_settings import DATABASES

DATABASES["default"]["OPTIONS"].pop("pool", None)
DATABASES["default"]["OPTIONS"]["application_name"] = os.environ.get("REALTIME_TEST_APPLICATION_NAME", "")
DATABASES["default"]["CONN_MAX_AGE"] = None
