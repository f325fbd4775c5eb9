"""The demo settings for a database reached through PgBouncer 1.18 in transaction mode.

It keeps no prepared statement across transactions, so psycopg must not prepare any
(``prepare_threshold``: Django's own cursors never do; the worker's login pool honours it).
"""

from tests.worker_settings import *  # noqa: F403  (with REALTIME_TEST_OVERRIDES)
from tests.worker_settings import DATABASES

DATABASES["default"]["OPTIONS"]["prepare_threshold"] = None
