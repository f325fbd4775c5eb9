"""Model change events: declare a model once, and every change to it is published live.

    import realtime

    realtime.track(Order)  # in your AppConfig.ready(), or @realtime.track on the model class

Each save (``created`` or ``changed``) and delete (``deleted``) of a tracked model
publishes, in the transaction of the change, an event named ``model.change`` to
two topics: ``model:<app_label>.<model_name>`` (for lists) and
``model:<app_label>.<model_name>:<pk>`` (for one object's page). Its data holds
no field values, only what the admin would say in its own messages::

    {"action": "changed", "model": "shop.order", "pk": "42", "repr": "Order 42",
     "actor": {"id": 1, "username": "alice"}, "at": "2026-11-25T14:02:07.123456+00:00"}

Only subscribers of those topics receive it, and ``realtime.topics`` decides
every ``model:...`` topic by permission, whatever ``TOPICS`` or
``TOPIC_POLICY`` say: the view or change permission on the model (superusers
hold both). So nobody learns of a change they could not see in the admin.
A model whose ``ModelAdmin`` decides per object (it overrides
``has_view_permission``, ``has_change_permission`` or ``get_queryset``) is
the exception: its topics take no subscribers, and its events go, at
publish time, to the users that admin would show the object to
(:mod:`realtime.object_rules`).

The admin is the first user of this: changes made through a Django admin
site publish these events for every registered model, unless its
``ModelAdmin`` sets ``realtime_changes = False`` (``realtime.live_admin``).
Changes made elsewhere (your views, scripts, tasks) publish only for the
models passed to :func:`track`. ``REALTIME["MODEL_CHANGES"] = False`` turns
everything here off.

``actor`` is who made the change when it is known: the admin's request user,
the user set by :class:`realtime.middleware.ChangeActorMiddleware` for your
own views, or by ``with realtime.acting_as(user):`` in scripts and tasks;
otherwise ``null``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.apps import apps
from django.contrib.auth import get_permission_codename, get_user_model
from django.db.models import Model
from django.db.models.signals import post_delete, post_save, pre_delete
from django.utils import timezone

from realtime.conf import settings
from realtime.object_rules import allowed_users, decides_per_object, object_admins

__all__ = [
    "MODEL_EVENT",
    "MODEL_TOPIC_PREFIX",
    "Change",
    "acting_as",
    "admin_request",
    "admin_tracks",
    "changed_since",
    "current_actor",
    "decided_per_object",
    "decides_per_object",
    "defer_log_entry",
    "deferred_object_changes",
    "is_tracked",
    "model_topic",
    "newest_position",
    "topic_permissions",
    "track",
    "untrack",
]

MODEL_EVENT = "model.change"
MODEL_TOPIC_PREFIX = "model:"
# As LogEntry.object_repr: what the admin itself keeps of an object's str().
REPR_LENGTH = 200
TOPIC_LENGTH = 200  # publish()'s limit on a topic

_explicit: set[type[Model]] = set()
# True while an admin view runs (set by realtime.live_admin): its registered models publish.
_in_admin: contextvars.ContextVar[bool] = contextvars.ContextVar("realtime_in_admin", default=False)
# The actor of changes made now: a user, or a callable returning one (read
# only when a change is published, so a request's lazy user costs nothing).
_actor: contextvars.ContextVar[Any] = contextvars.ContextVar("realtime_actor", default=None)


@dataclass
class _Deferred:
    """Changes to models decided per object, queued until the admin view that made them is done."""

    # (label_lower, str(pk)) -> [instance, action, users decided before a delete or None, pk]
    changes: dict[tuple[str, str], list[Any]] = field(default_factory=dict)
    log_entries: list[Any] = field(default_factory=list)


_deferred: contextvars.ContextVar[_Deferred | None] = contextvars.ContextVar("realtime_deferred", default=None)


def track(model: type[Model]) -> type[Model]:
    """Publish ``model.change`` events for every save and delete of ``model``; return ``model``.

    Call it once per model, in your ``AppConfig.ready()`` or as a class
    decorator (``@realtime.track``). Calling it again does nothing. Saves
    with ``raw=True`` (``loaddata``) publish nothing; so does a save of the
    user model's ``last_login`` alone (every login does one).

    Raises:
        TypeError: ``model`` is not a Django model class, or is abstract.
    """
    if not isinstance(model, type) or not issubclass(model, Model) or model._meta.abstract:
        raise TypeError(f"realtime.track() needs a concrete Django model class, not {model!r}.")
    _explicit.add(model)
    connect(model)
    return model


def connect(model: type[Model]) -> None:
    """Connect the change receivers for ``model`` (idempotent); whether it publishes is decided per change."""
    uid = f"realtime.changes.{model._meta.label_lower}.{id(model)}"
    post_save.connect(_on_saved, sender=model, dispatch_uid=uid)
    pre_delete.connect(_on_deleting, sender=model, dispatch_uid=uid)
    post_delete.connect(_on_deleted, sender=model, dispatch_uid=uid)


def is_tracked(model: type[Model]) -> bool:
    """Return True if changes to ``model`` made now are published.

    That is: ``MODEL_CHANGES`` is on, and ``model`` was passed to
    :func:`track`, or an admin view is running and :func:`admin_tracks` it.
    """
    if not settings.MODEL_CHANGES:
        return False
    return model in _explicit or (_in_admin.get() and admin_tracks(model))


def admin_tracks(model: type[Model]) -> bool:
    """Return True if ``model`` is registered in an admin site whose ``ModelAdmin`` does not opt out.

    (``realtime_changes = False``). The admin publishes the changes made
    through it to such models; ``MODEL_CHANGES`` is not looked at here.
    """
    if not apps.is_installed("django.contrib.admin"):
        return False
    from django.contrib.admin.sites import all_sites

    for site in all_sites:
        model_admin = site._registry.get(model)
        if model_admin is not None and getattr(model_admin, "realtime_changes", True) is not False:
            return True
    return False


def decided_per_object(model: type[Model]) -> bool:
    """Return True if a ModelAdmin registering ``model`` decides who may see each object
    (:func:`realtime.object_rules.decides_per_object`).

    Its changes then go, at publish time, to the users the admin would show
    the object to (:func:`realtime.object_rules.allowed_users`), not to the
    subscribers of its topics: nobody may subscribe to those.
    """
    return bool(object_admins(model))


@contextlib.contextmanager
def acting_as(user: Any) -> Iterator[None]:
    """Within this block, changes to tracked models are published as made by ``user``.

    ``user`` is a user instance, ``None`` (unknown), or a callable returning
    either, called only if a change is published. Blocks nest; each restores
    the previous actor when it ends.
    """
    token = _actor.set(user)
    try:
        yield
    finally:
        _actor.reset(token)


@contextlib.contextmanager
def admin_request(user: Any) -> Iterator[None]:
    """An admin view: changes to the admin's models publish, as made by ``user`` (see :func:`acting_as`)."""
    token = _in_admin.set(True)
    try:
        with acting_as(user):
            yield
    finally:
        _in_admin.reset(token)


@contextlib.contextmanager
def deferred_object_changes() -> Iterator[None]:
    """Within this block, changes to models decided per object (and their ``admin.logentry``) are queued;
    published when it ends without an exception, once per object.

    For an admin view that saves, inside its transaction: the object rules then
    see the object as the view left it (inlines and many-to-many fields are
    saved after the object itself), and are evaluated once for the change and
    its log entry. A delete is still decided before its row goes.
    """
    queue = _Deferred()
    token = _deferred.set(queue)
    try:
        yield
    finally:
        _deferred.reset(token)
    _publish_deferred(queue)


def defer_log_entry(entry: Any) -> bool:
    """Queue ``entry`` (an ``admin.logentry`` of a model decided per object) if changes are deferred now."""
    queue = _deferred.get()
    if queue is None:
        return False
    queue.log_entries.append(entry)
    return True


def _publish_deferred(queue: _Deferred) -> None:
    from realtime.signals import publish_object_log_entry

    decided: dict[tuple[str, str], list[int]] = {}
    for key, (instance, action, users, pk) in queue.changes.items():
        if users is None:
            users = allowed_users(object_admins(type(instance)), instance)
        decided[key] = users
        publish_change(instance, action, users=users, pk=pk)
    for entry in queue.log_entries:
        content_type = entry.content_type
        key = (f"{content_type.app_label}.{content_type.model}", str(entry.object_id))
        publish_object_log_entry(entry, decided.get(key))


def current_actor() -> Any:
    """Return the user of the innermost :func:`acting_as` block (None if none, or anonymous)."""
    actor = _actor.get()
    if callable(actor):
        actor = actor()
    if actor is None or not getattr(actor, "is_authenticated", False):
        return None
    return actor


def model_topic(model: type[Model] | Model, pk: Any = None) -> str:
    """Return the topic of ``model``'s changes, or of one object's.

    ``model_topic(Order)`` is ``"model:shop.order"``; ``model_topic(order)``
    and ``model_topic(Order, 42)`` are ``"model:shop.order:42"``.
    """
    if isinstance(model, Model):
        model, pk = type(model), model.pk
    topic = f"{MODEL_TOPIC_PREFIX}{model._meta.label_lower}"
    return topic if pk is None else f"{topic}:{pk}"


def topic_permissions(topic: str) -> tuple[str, ...] | None:
    """Return the permissions any one of which allows subscribing to ``topic``.

    ``None`` if ``topic`` is not a model topic (it does not start with
    ``model:``). For ``model:<app_label>.<model_name>`` and
    ``model:<app_label>.<model_name>:<pk>``, the model's view and change
    permissions (as ``"app_label.codename"``); ``()`` (nobody) when the name
    is malformed or names no installed model, and for a model whose admin
    :func:`decided_per_object` (its events are addressed to users instead).
    Model names are lower case, as in ``Model._meta.label_lower``.
    """
    if not topic.startswith(MODEL_TOPIC_PREFIX):
        return None
    model = _topic_model(topic)
    if model is None or decided_per_object(model):
        return ()
    opts = model._meta
    return tuple(f"{opts.app_label}.{get_permission_codename(action, opts)}" for action in ("view", "change"))


@functools.lru_cache(maxsize=1024)
def _topic_model(topic: str) -> type[Model] | None:
    label = topic[len(MODEL_TOPIC_PREFIX) :].split(":", 1)[0]
    app_label, dot, model_name = label.partition(".")
    if not dot or not app_label or not model_name:
        return None
    try:
        model = apps.get_model(app_label, model_name)
    except LookupError:
        return None
    if model._meta.label_lower != label or topic.endswith(":"):
        return None
    return model


def newest_position() -> int:
    """Return the newest committed event id (sync, one query): what a page rendered now has seen.

    Render it into a page and give it to the client as ``lastId``: events
    committed between the render and the connection are then replayed
    instead of missed. Also what :func:`changed_since` compares with.
    Read from the primary (:func:`realtime.retention.reached_position`).
    """
    from realtime.retention import reached_position

    return reached_position()


@dataclass(frozen=True)
class Change:
    """A committed change to one object, as its ``model.change`` event tells it."""

    action: str  # "created", "changed", "deleted", or "unknown" (see changed_since)
    actor: str | None  # the username, None if unknown
    at: datetime | None
    position: int


def changed_since(model: type[Model] | Model, pk: Any, position: int) -> Change | None:
    """Return the newest change to an object committed after event id ``position``, or None (sync).

    ``position`` is a :func:`newest_position` read when the page was
    rendered. If events after it were pruned (``RETENTION``), nobody can
    tell: the answer is a :class:`Change` with action ``"unknown"``. Only
    changes that published events count: those made through the admin, and
    any change to a model passed to :func:`track`.
    """
    from realtime.models import Event
    from realtime.retention import horizon

    topic = model_topic(model, pk)
    row = (
        Event.objects.filter(name=MODEL_EVENT, topic=topic, position__gt=position)
        .order_by("-position")
        .values_list("position", "data")
        .first()
    )
    if row is not None:
        found, data = row
        actor = data.get("actor") if isinstance(data, dict) else None
        try:
            at = datetime.fromisoformat(data["at"])
        except (KeyError, TypeError, ValueError):
            at = None
        return Change(
            action=str(data.get("action", "changed")),
            actor=str(actor["username"]) if isinstance(actor, dict) and "username" in actor else None,
            at=at,
            position=found or 0,  # never None: position__gt
        )
    pruned = horizon()
    if pruned > position:
        return Change(action="unknown", actor=None, at=None, position=pruned)
    return None


def _clean_text(text: str, limit: int) -> str:
    # publish() refuses NUL and lone surrogates (PostgreSQL cannot store them).
    text = text.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")
    return text[:limit]


def _repr(instance: Model) -> str:
    try:
        text = str(instance)
    except Exception:  # a broken __str__ must not break the save that publishes
        text = f"{instance._meta.verbose_name} ({instance.pk})"
    return _clean_text(text, REPR_LENGTH)


def _actor_data() -> dict[str, Any] | None:
    user = current_actor()
    if user is None:
        return None
    return {"id": user.pk, "username": _clean_text(str(user.get_username()), 150)}


def _valid_topic(topic: str) -> bool:
    return len(topic) <= TOPIC_LENGTH and topic.isprintable()


def publish_change(instance: Model, action: str, *, users: list[int] | None = None, pk: Any = None) -> None:
    """Publish ``model.change`` for ``instance`` in the current transaction (tracked or not).

    To the subscribers of the model's and the object's topics; for a model
    whose admin :func:`decided_per_object`, to ``users`` instead (by default
    :func:`realtime.object_rules.allowed_users` now, which needs the row: a
    delete computes them before the row goes). The events name the topics
    either way, so that pages can tell them apart and stale-save checks find them.
    ``pk``: the object's primary key when ``instance.pk`` no longer says it (a delete clears it).

    Raises what :func:`realtime.publish_many` raises on a database error.
    """
    from realtime import publish_many

    model = type(instance)
    if pk is None:
        pk = instance.pk
    data = {
        "action": action,
        "model": model._meta.label_lower,
        "pk": str(pk),
        "repr": _repr(instance),
        "actor": _actor_data(),
        "at": timezone.now().isoformat(),
    }
    audience: dict[str, Any] = {}
    admins = object_admins(model)
    if admins:
        audience["users"] = allowed_users(admins, instance) if users is None else users
    events: list[dict[str, Any]] = [{"event": MODEL_EVENT, "data": data, "topic": model_topic(model), **audience}]
    object_topic = model_topic(model, pk)
    # A primary key too long or odd for a topic (rare text keys): the model's topic still tells.
    if _valid_topic(object_topic):
        events.append({"event": MODEL_EVENT, "data": data, "topic": object_topic, **audience})
    publish_many(events)


def _on_saved(
    sender: type[Model], instance: Model, created: bool, raw: bool = False, update_fields: Any = None, **kwargs: Any
) -> None:
    if raw or not is_tracked(sender):
        return
    if update_fields is not None and set(update_fields) <= {"last_login"} and sender is get_user_model():
        return  # a login, not an edit
    action = "created" if created else "changed"
    queue = _deferred.get()
    if queue is not None and object_admins(sender):
        key = (sender._meta.label_lower, str(instance.pk))
        if key in queue.changes and queue.changes[key][1] == "created":
            action = "created"  # created, then saved again by the same view
        queue.changes[key] = [instance, action, None, instance.pk]
        return
    publish_change(instance, action)


def _on_deleting(sender: type[Model], instance: Model, **kwargs: Any) -> None:
    # The rules may query the row (get_queryset): decide before it goes.
    if not is_tracked(sender):
        return
    admins = object_admins(sender)
    if admins:
        users = allowed_users(admins, instance)
        queue = _deferred.get()
        if queue is not None:
            queue.changes[(sender._meta.label_lower, str(instance.pk))] = [instance, "deleted", users, instance.pk]
        else:
            instance._realtime_allowed = users  # type: ignore[attr-defined]


def _on_deleted(sender: type[Model], instance: Model, **kwargs: Any) -> None:
    if not is_tracked(sender):
        return
    if _deferred.get() is not None and object_admins(sender):
        return  # queued by _on_deleting
    publish_change(instance, "deleted", users=getattr(instance, "_realtime_allowed", None))


def untrack(model: type[Model]) -> None:
    """Undo :func:`track` for ``model`` (an admin-registered model stays tracked by its admin)."""
    _explicit.discard(model)
