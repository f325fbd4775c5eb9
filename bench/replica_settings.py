"""Settings of the workers that read the outbox from a streaming replica ((g) ``--replica``).

The bench's settings (:mod:`bench.settings`) plus ``DATABASES["replica"]``, the
libpq string in ``BENCH_REPLICA_URL`` (the replica's copy of the run's
database), and ``REALTIME["READ_DATABASE"] = "replica"``: the workers LISTEN
on the primary and read the outbox (and client replays) from the replica.
The replica's alias keeps the primary's pool settings.
"""

import os

from psycopg.conninfo import conninfo_to_dict

from bench.settings import *  # noqa: F403
from bench.settings import DATABASES, REALTIME

_params = conninfo_to_dict(os.environ["BENCH_REPLICA_URL"])
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
REALTIME = {**REALTIME, "READ_DATABASE": "replica"}
