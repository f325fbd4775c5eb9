"""Who is online, across every worker: read from Django code (the workers write it).

Each websocket worker writes its connections and their topics to the presence
tables every ``REALTIME["PRESENCE_INTERVAL"]`` seconds (``realtime.worker.presence``);
a worker that stops writing expires after its lease. These functions read them.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.db.models import QuerySet
from django.db.models.functions import Now

from realtime.models import PresenceConnection

__all__ = ["online_connections", "online_users"]


def online_users(topic: str | None = None) -> QuerySet[Any]:
    """Return the users with at least one connection on a live worker (sync).

    Args:
        topic: if given, only users with a connection subscribed to it.

    Returns:
        A lazy QuerySet of the user model; filter or order it as usual.
        Workers write presence every ``PRESENCE_INTERVAL`` seconds, so a
        connection appears, and disappears, up to that long after the fact
        (a worker that dies without shutting down: up to its lease).
    """
    return get_user_model()._default_manager.filter(pk__in=online_connections(topic).values("user_id"))


def online_connections(topic: str | None = None) -> QuerySet[PresenceConnection]:
    """Return the connections on live workers (subscribed to ``topic`` if given) (sync)."""
    rows = PresenceConnection.objects.filter(worker__expires_at__gt=Now())
    if topic is not None:
        rows = rows.filter(subscriptions__topic=topic)
    return rows
