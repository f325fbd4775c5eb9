"""Who may subscribe to a topic.

By default ``REALTIME["TOPICS"]`` decides: it maps fnmatch patterns to the
permission a user needs to subscribe (``"app_label.codename"``) or None for
any authenticated user. The first pattern that matches decides; a topic no
pattern matches is refused. The default, ``{"*": None}``, lets every
authenticated user subscribe to every topic: publish with ``topic=`` only
what any logged-in user may see, or configure patterns.

``REALTIME["TOPIC_POLICY"]``, a dotted path to ``can_subscribe(user, topic) ->
bool``, replaces the patterns with your own code (e.g. "is this user a member
of this chat room?"). It receives the user model instance and runs in the
worker's thread pool, so it may use the ORM. An exception in it counts as a
refusal and is logged.

Model topics (``model:<app_label>.<model_name>`` and ``...:<pk>``, see
``realtime.changes``) are decided first, by permission, whatever the patterns
or the policy say: the model's view or change permission allows them (and
superusers); any other ``model:`` name is refused.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from fnmatch import fnmatchcase
from typing import Any, cast

from django.contrib.auth import get_user_model
from django.db import DatabaseError
from django.utils.module_loading import import_string

from realtime.changes import topic_permissions
from realtime.conf import settings
from realtime.core.audience import Identity

__all__ = ["can_subscribe", "decide_by_policy", "load_policy", "model_topic_allowed"]

logger = logging.getLogger("realtime.topics")


def model_topic_allowed(identity: Identity, topic: str) -> bool | None:
    """Decide a model topic by permission (no I/O); None if ``topic`` is not one (``model:...``)."""
    permissions = topic_permissions(topic)
    if permissions is None:
        return None
    return any(identity.has_perm(permission) for permission in permissions)


def can_subscribe(identity: Identity, topic: str) -> bool:
    """Decide a model topic by permission, any other by the ``TOPICS`` patterns (no I/O)."""
    decided = model_topic_allowed(identity, topic)
    if decided is not None:
        return decided
    for pattern, permission in settings.TOPICS.items():
        if fnmatchcase(topic, pattern):
            return permission is None or identity.has_perm(permission)
    return False


@functools.cache
def load_policy(path: str) -> Callable[[Any, str], bool]:
    """Import the ``TOPIC_POLICY`` callable; raise ImportError or TypeError if it is not one."""
    policy = import_string(path)
    if not callable(policy):
        raise TypeError(f"{path} is not callable")
    return cast(Callable[[Any, str], bool], policy)


def _custom(path: str, user: Any, topic: str) -> bool:
    try:
        return load_policy(path)(user, topic) is True
    except Exception:
        logger.exception("TOPIC_POLICY %s failed for user %d and topic %r: refused", path, user.pk, topic)
        return False


def decide_by_policy(path: str, user_id: int, topics: list[str]) -> list[str]:
    """Return those of ``topics`` that ``TOPIC_POLICY`` (at ``path``) lets ``user_id`` subscribe to (sync, ORM)."""
    try:
        user = get_user_model()._default_manager.filter(pk=user_id).first()
    except DatabaseError as exc:
        logger.warning("TOPIC_POLICY: cannot read user %d, topics refused: %s", user_id, exc)
        return []
    if user is None or not getattr(user, "is_active", True):
        return []
    return [topic for topic in topics if _custom(path, user, topic)]
