"""Settings of this project's processes in the benchmark: the project's, production-like.

- ``DEBUG = False`` (Django keeps no query log);
- tokens are minted in bulk before a wave of connections, so they live longer
  (``TOKEN_MAX_AGE``) than the 60 s default; every other ``REALTIME`` key keeps
  its default (compression, thread pool, limits, logging level).
"""

from project.settings import *  # noqa: F403
from project.settings import REALTIME

DEBUG = False
REALTIME = {**REALTIME, "TOKEN_MAX_AGE": 3600}
