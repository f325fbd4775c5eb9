"""publish(): write an event to the outbox in the caller's transaction.

Nothing is sent from here. The row becomes visible to the websocket workers
when the caller's transaction commits; a deferred trigger then gives it its
commit-ordered position and NOTIFYs the ``realtime`` channel with an empty
payload (a wake-up, never the event). A rollback leaves no trace.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from django.contrib.auth.models import Group
from django.core.serializers.json import DjangoJSONEncoder
from django.db import DEFAULT_DB_ALIAS

from realtime.conf import settings
from realtime.models import Event

__all__ = ["CONTROL_PREFIX", "NOTIFY_CHANNEL", "publish", "publish_control"]

NOTIFY_CHANNEL = "realtime"
CONTROL_PREFIX = "realtime."


def publish(
    event: str,
    data: Any = None,
    *,
    users: Iterable[Any] = (),
    groups: Iterable[Any] = (),
    permission: str | None = None,
    staff: bool = False,
    everyone: bool = False,
    topic: str | None = None,
    using: str = DEFAULT_DB_ALIAS,
) -> Event:
    """Publish ``event`` with ``data`` to an audience, inside the current transaction.

    The audience is the union of: ``users`` (user objects or primary keys),
    ``groups`` (Group objects or names), holders of ``permission``
    (``"app_label.codename"``; superusers hold every permission), active
    ``staff``, ``everyone`` authenticated, and the subscribers of ``topic``.
    Only active users ever receive anything.

    Returns:
        The saved :class:`~realtime.models.Event`. Its ``position`` (the id
        clients see) is assigned when the transaction commits.

    Raises:
        TypeError: if no audience is given, or ``data`` is not JSON-serialisable
            (``DjangoJSONEncoder`` handles dates, decimals and UUIDs).
        ValueError: if ``event`` is empty, too long or reserved, or the
            encoded ``data`` is larger than ``REALTIME["MAX_DATA_SIZE"]``.
    """
    _check_name(event)
    user_ids = [_user_id(user) for user in users]
    group_names = [_group_name(group) for group in groups]
    if permission is not None and (not isinstance(permission, str) or permission.count(".") != 1):
        raise ValueError(f"permission must look like 'app_label.codename', not {permission!r}.")
    if topic is not None and (not isinstance(topic, str) or not topic or len(topic) > 200):
        raise ValueError("topic must be a non-empty string of at most 200 characters.")
    if not (user_ids or group_names or permission or staff or everyone or topic):
        raise TypeError(
            f"publish({event!r}) has no audience: pass users=, groups=, permission=, "
            "staff=True, everyone=True or topic=."
        )
    return Event.objects.using(using).create(
        name=event,
        data=_checked_data(data),
        topic=topic,
        users=user_ids,
        groups=group_names,
        permissions=[permission] if permission else [],
        staff=staff,
        everyone=everyone,
    )


def publish_control(name: str, data: dict[str, Any], *, using: str = DEFAULT_DB_ALIAS) -> Event:
    """Publish a control event for the workers (never sent to a client)."""
    assert name.startswith(CONTROL_PREFIX), name
    return Event.objects.using(using).create(name=name, data=data, control=True)


def publish_audience(event: str, data: Any, *, permissions: list[str], staff_only: bool) -> Event:
    """Publish to holders of any of ``permissions``, optionally only to staff.

    Used by the admin integration, whose audience ("staff who may view or
    change the model") is not a plain union.
    """
    return Event.objects.create(name=event, data=_checked_data(data), permissions=permissions, staff_only=staff_only)


def _check_name(event: object) -> None:
    if not isinstance(event, str) or not event or len(event) > 200:
        raise ValueError("event must be a non-empty string of at most 200 characters.")
    if event.startswith(CONTROL_PREFIX):
        raise ValueError(f"event names starting with {CONTROL_PREFIX!r} are reserved.")


def _checked_data(data: Any) -> Any:
    if data is None:
        data = {}
    try:
        encoded = json.dumps(data, cls=DjangoJSONEncoder)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"publish() data must be JSON-serialisable: {exc}") from None
    size = len(encoded.encode())
    if size > settings.MAX_DATA_SIZE:
        raise ValueError(
            f"publish() data is {size} bytes once encoded; the limit is "
            f"REALTIME['MAX_DATA_SIZE'] = {settings.MAX_DATA_SIZE} bytes."
        )
    # Store what the encoder produced, so dates and decimals arrive as strings.
    return json.loads(encoded)


def _user_id(user: Any) -> int:
    pk = getattr(user, "pk", user)
    if isinstance(pk, bool) or not isinstance(pk, int):
        raise TypeError(f"users must be user objects or integer primary keys, not {user!r}.")
    return pk


def _group_name(group: Any) -> str:
    if isinstance(group, Group):
        return group.name
    if isinstance(group, str) and group:
        return group
    raise TypeError(f"groups must be Group objects or group names, not {group!r}.")
