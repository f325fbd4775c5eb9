"""Settings for worker processes that read the outbox from a test replica (tests/replica_support.py).

The test settings (``tests.worker_settings``, with ``REALTIME_TEST_OVERRIDES``)
plus ``DATABASES["replica"]`` from ``REALTIME_TEST_REPLICA_URL``, a libpq
string of the replica's copy of the test database.
"""

import os

from psycopg.conninfo import conninfo_to_dict

from tests.worker_settings import *  # noqa: F403
from tests.worker_settings import DATABASES

_params = conninfo_to_dict(os.environ["REALTIME_TEST_REPLICA_URL"])
_KEYS = {"dbname": "NAME", "user": "USER", "password": "PASSWORD", "host": "HOST", "port": "PORT"}
DATABASES = {
    **DATABASES,
    "replica": {
        **{key: value for key, value in DATABASES["default"].items() if key not in _KEYS.values()},
        **{_KEYS[key]: value for key, value in _params.items() if key in _KEYS},
        "OPTIONS": {
            **{key: value for key, value in DATABASES["default"]["OPTIONS"].items() if key == "pool"},
            **{key: value for key, value in _params.items() if key not in _KEYS},
        },
    },
}
