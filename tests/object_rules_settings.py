"""Worker settings with tests.object_rules' GroupAdmin (a worker must decide as the web process does)."""

from tests.worker_settings import *  # noqa: F403
from tests.worker_settings import INSTALLED_APPS

# After django.contrib.admin and auth: their admin modules register GroupAdmin first.
INSTALLED_APPS = [*INSTALLED_APPS, "tests.object_rules_app.ObjectRulesConfig"]
