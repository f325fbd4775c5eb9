"""Who may subscribe to a topic.

``REALTIME["TOPICS"]`` maps fnmatch patterns to the permission a user needs
to subscribe (``"app_label.codename"``) or None for any authenticated user.
The first pattern that matches decides; a topic no pattern matches is
refused. The default, ``{"*": None}``, lets every authenticated user
subscribe to every topic: publish with ``topic=`` only what any logged-in
user may see, or configure patterns.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from realtime.conf import settings
from realtime.tokens import Identity

__all__ = ["can_subscribe"]


def can_subscribe(identity: Identity, topic: str) -> bool:
    """Return True if ``identity`` may subscribe to ``topic`` (no I/O)."""
    for pattern, permission in settings.TOPICS.items():
        if fnmatchcase(topic, pattern):
            return permission is None or identity.has_perm(permission)
    return False
