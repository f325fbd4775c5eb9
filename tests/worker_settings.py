"""Settings for worker processes started by tests: the project's, plus REALTIME overrides.

``REALTIME_TEST_OVERRIDES`` holds a JSON object merged into ``REALTIME``.
"""

import json
import os

from project.settings import *  # noqa: F403
from project.settings import REALTIME

REALTIME = {**REALTIME, **json.loads(os.environ.get("REALTIME_TEST_OVERRIDES", "{}"))}
