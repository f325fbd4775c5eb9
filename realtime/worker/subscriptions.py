"""Who may subscribe to a topic, asked from the event loop (the policy itself is realtime.topics)."""

from __future__ import annotations

from collections.abc import Iterable

from realtime import topics
from realtime.conf import settings
from realtime.core.audience import Identity
from realtime.worker.db import run_sync

__all__ = ["allowed_topics", "may_subscribe"]


async def allowed_topics(identity: Identity, names: Iterable[str]) -> list[str]:
    """Return those of ``names`` that ``identity`` may subscribe to, in order.

    ``TOPICS`` patterns are applied at once; a ``TOPIC_POLICY`` decides every
    topic in one call to the thread pool (a login may name up to 100 topics).
    """
    names = list(names)
    path = settings.TOPIC_POLICY
    if path is None:
        return [name for name in names if topics.can_subscribe(identity, name)]
    if not names:
        return []
    return await run_sync(topics.decide_by_policy, path, identity.user_id, names)


async def may_subscribe(identity: Identity, name: str) -> bool:
    """Return True if ``identity`` may subscribe to topic ``name``."""
    return bool(await allowed_topics(identity, [name]))
