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

    Model topics (``model:...``) and ``TOPICS`` patterns are decided at once;
    a ``TOPIC_POLICY`` decides the other topics in one call to the thread
    pool (a login may name up to 100 topics).
    """
    names = list(names)
    path = settings.TOPIC_POLICY
    if path is None:
        return [name for name in names if topics.can_subscribe(identity, name)]
    decided = {name: topics.model_topic_allowed(identity, name) for name in names}
    others = [name for name, allowed in decided.items() if allowed is None]
    by_policy = set(await run_sync(topics.decide_by_policy, path, identity.user_id, others)) if others else set()
    return [name for name in names if decided[name] or name in by_policy]


async def may_subscribe(identity: Identity, name: str) -> bool:
    """Return True if ``identity`` may subscribe to topic ``name``."""
    return bool(await allowed_topics(identity, [name]))
