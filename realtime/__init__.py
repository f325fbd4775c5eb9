"""Live, commit-safe events from Django to browsers over websockets.

Import the API from here: ``from realtime import publish``. The functions
import ``realtime.outbox`` on first call, because this package is imported
while Django loads its apps, before models may be.

- :func:`publish` and :func:`publish_many` write to the outbox in the
  caller's transaction (sync code).
- :func:`apublish` and :func:`apublish_many` are their twins for async code,
  following Django's async ORM: each runs its sync twin through
  ``sync_to_async`` (thread-sensitive, so on the connection of the request's
  other ORM calls). Outside ``transaction.atomic()``, that connection is in
  autocommit mode and the event commits at once, on its own. To publish
  atomically with a change, write both in a sync function under
  ``transaction.atomic()`` and await it with ``sync_to_async``.
- :func:`track` declares a model whose changes are published as
  ``model.change`` events (see ``realtime.changes``), :func:`acting_as` says
  who makes the changes in a block, and :func:`model_topic` names the topics
  a page subscribes to.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, TypeVar

from asgiref.sync import sync_to_async

if TYPE_CHECKING:
    from django.db.models import Model

    from realtime.models import Event

__all__ = ["acting_as", "apublish", "apublish_many", "model_topic", "publish", "publish_many", "track"]

M = TypeVar("M", bound="type[Model]")


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
) -> Event:
    """Publish ``event`` with ``data`` to an audience, inside the current transaction.

    See :func:`realtime.outbox.publish` for the audience, the return value and the errors.
    """
    from realtime.outbox import publish as outbox_publish

    return outbox_publish(
        event, data, users=users, groups=groups, permission=permission, staff=staff, everyone=everyone, topic=topic
    )


def publish_many(events: Iterable[dict[str, Any]]) -> int:
    """Publish many events in the current transaction with one COPY; return how many.

    See :func:`realtime.outbox.publish_many`.
    """
    from realtime.outbox import publish_many as outbox_publish_many

    return outbox_publish_many(events)


async def apublish(
    event: str,
    data: Any = None,
    *,
    users: Iterable[Any] = (),
    groups: Iterable[Any] = (),
    permission: str | None = None,
    staff: bool = False,
    everyone: bool = False,
    topic: str | None = None,
) -> Event:
    """Async :func:`publish`: in autocommit mode (the usual case in async code), it commits at once."""
    return await sync_to_async(publish)(
        event, data, users=users, groups=groups, permission=permission, staff=staff, everyone=everyone, topic=topic
    )


async def apublish_many(events: Iterable[dict[str, Any]]) -> int:
    """Async :func:`publish_many`; ``events`` is iterated in Django's sync thread, so it may query the ORM."""
    return await sync_to_async(publish_many)(events)


def track(model: M) -> M:
    """Publish ``model.change`` events for every save and delete of ``model``; return it (a class decorator too).

    See :func:`realtime.changes.track`.
    """
    from realtime.changes import track as changes_track

    changes_track(model)
    return model


def acting_as(user: Any) -> AbstractContextManager[None]:
    """Changes to tracked models made in this ``with`` block are published as made by ``user``.

    See :func:`realtime.changes.acting_as`.
    """
    from realtime.changes import acting_as as changes_acting_as

    return changes_acting_as(user)


def model_topic(model: Any, pk: Any = None) -> str:
    """Return ``"model:app_label.model_name"``, or with ``pk`` (or given an instance) ``"...:<pk>"``.

    See :func:`realtime.changes.model_topic`.
    """
    from realtime.changes import model_topic as changes_model_topic

    return changes_model_topic(model, pk)
