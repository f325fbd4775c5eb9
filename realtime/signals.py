"""Django signals -> outbox events.

- Every admin ``LogEntry`` becomes an ``admin.logentry`` event for active staff
  who may view or change the model. ``post_save`` covers single entries; since
  Django 5.1 ``LogEntry.objects.log_actions()`` bulk-creates several entries
  (bulk delete) without signals, so ``connect()`` wraps it too.
- Logout publishes a control event carrying a hash of the session key (never
  the key) so the workers close that session's sockets.
- Changes to a user (active, staff, superuser, groups, permissions) publish a
  control event so the workers re-check that user's open connections. So do
  a group renamed or deleted, and a permission deleted (also by a cascade,
  such as deleting its content type): its holders lose it.
"""

from __future__ import annotations

import functools
from typing import Any

from django.apps import apps
from django.contrib.admin.models import ADDITION, CHANGE, DELETION, LogEntry, LogEntryManager
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.contrib.auth.signals import user_logged_out
from django.core.exceptions import ValidationError
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_delete

from realtime.changes import defer_log_entry
from realtime.core.audience import digest
from realtime.object_rules import allowed_users, object_admins
from realtime.outbox import publish, publish_audience, publish_control

__all__ = ["ADMIN_EVENT", "admin_event_data", "connect", "publish_object_log_entry"]

ADMIN_EVENT = "admin.logentry"
_ACTIONS = {ADDITION: "addition", CHANGE: "change", DELETION: "deletion"}


def admin_event_data(entry: LogEntry) -> dict[str, Any]:
    """Return the ``data`` of the ``admin.logentry`` event for ``entry``."""
    content_type = entry.content_type
    actor = entry.user
    return {
        "action": _ACTIONS.get(entry.action_flag, str(entry.action_flag)),
        "object_repr": entry.object_repr,
        "content_type": f"{content_type.app_label}.{content_type.model}" if content_type else None,
        "object_id": None if entry.object_id is None else str(entry.object_id),
        "change_message": entry.get_change_message(),
        "actor": {"id": actor.pk, "username": actor.get_username()},
        "admin_url": None if entry.action_flag == DELETION else (entry.get_admin_url() or None),
        "action_time": entry.action_time.isoformat(),
    }


def publish_log_entry(entry: LogEntry) -> None:
    """Publish ``entry`` to active staff who may view or change its model.

    When a ModelAdmin of the model decides who may see each object
    (:mod:`realtime.object_rules`), to the users it would show the object to
    (and the user who acted), or only to the user who acted once the object is gone.
    """
    content_type = entry.content_type
    if content_type is None:
        # The model is gone; those who may read the admin log still may.
        permissions = ["admin.view_logentry"]
    else:
        model_class = content_type.model_class()
        if model_class is not None and object_admins(model_class):
            if not defer_log_entry(entry):
                publish_object_log_entry(entry, None)
            return
        app, model = content_type.app_label, content_type.model
        permissions = [f"{app}.view_{model}", f"{app}.change_{model}"]
    publish_audience(ADMIN_EVENT, admin_event_data(entry), permissions=permissions, staff_only=True)


def publish_object_log_entry(entry: LogEntry, allowed: list[int] | None) -> None:
    """Publish ``entry`` of a model decided per object to ``allowed`` (the users its object's change
    went to), else to those the admin shows the object to now; and to the user who acted."""
    if allowed is None:
        allowed = []
        model_class = entry.content_type.model_class() if entry.content_type else None
        try:
            obj = model_class._base_manager.filter(pk=entry.object_id).first() if model_class else None
        except (ValueError, TypeError, ValidationError):
            obj = None  # an object_id its primary key field cannot read
        if obj is not None:
            allowed = allowed_users(object_admins(type(obj)), obj)
    publish(ADMIN_EVENT, admin_event_data(entry), users=sorted({*allowed, entry.user_id}))


def _on_log_entry_saved(sender: Any, instance: LogEntry, created: bool, raw: bool = False, **kwargs: Any) -> None:
    if created and not raw:
        publish_log_entry(instance)


def _wrap_log_actions() -> None:
    original = LogEntryManager.log_actions
    if getattr(original, "_realtime_wrapped", False):
        return

    @functools.wraps(original)
    def log_actions(self: LogEntryManager, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        # One entry is saved (post_save fires); several are bulk-created.
        if isinstance(result, list) and len(result) > 1:
            for entry in result:
                publish_log_entry(entry)
        return result

    log_actions._realtime_wrapped = True  # type: ignore[attr-defined]
    LogEntryManager.log_actions = log_actions  # type: ignore[method-assign]


def _on_logout(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    # Fired before the session is flushed: the key is still readable here.
    session_key = getattr(getattr(request, "session", None), "session_key", None)
    if session_key:
        publish_control("realtime.session_ended", {"session": digest(session_key)})


def _on_session_deleted(sender: Any, instance: Any, **kwargs: Any) -> None:
    # Session rows deleted by any means that sends signals (admin, clearsessions,
    # SessionStore.delete()); raw SQL is caught by the periodic re-validation.
    publish_control("realtime.session_ended", {"session": digest(instance.session_key)})


def _on_user_deleted(sender: Any, instance: Any, **kwargs: Any) -> None:
    publish_control("realtime.user_changed", {"users": [instance.pk]})


def _on_user_saved(sender: Any, instance: Any, created: bool, update_fields: Any = None, **kwargs: Any) -> None:
    if created or (update_fields is not None and set(update_fields) <= {"last_login"}):
        return  # a login saves last_login: nothing a connection depends on
    publish_control("realtime.user_changed", {"users": [instance.pk]})


def _on_rights_m2m(sender: Any, instance: Any, action: str, pk_set: Any, **kwargs: Any) -> None:
    """user.groups, user.user_permissions or group.permissions changed, from either side.

    Clears are handled before they happen (``pre_clear``), while the affected
    rows can still be read; the control event commits with the change anyway.
    """
    if action not in ("post_add", "post_remove", "pre_clear"):
        return
    User = get_user_model()
    clearing = action == "pre_clear"
    users: list[int] = []
    groups: list[str] = []
    if isinstance(instance, User):
        users = [instance.pk]
    elif isinstance(instance, Group):
        if sender is User.groups.through:  # group.user_set changed: those users
            users = sorted(instance.user_set.values_list("pk", flat=True) if clearing else pk_set or ())
        else:  # group.permissions changed: its members
            groups = [instance.name]
    elif isinstance(instance, Permission):
        if sender is User.user_permissions.through:  # permission.user_set changed
            users = sorted(instance.user_set.values_list("pk", flat=True) if clearing else pk_set or ())
        else:  # permission.group_set changed: the members of those groups
            group_ids = instance.group_set.values_list("pk", flat=True) if clearing else pk_set or ()
            groups = sorted(Group.objects.filter(pk__in=group_ids).values_list("name", flat=True))
    if users or groups:
        publish_control("realtime.user_changed", {"users": users, "groups": groups})


def _on_group_changed(sender: Any, instance: Group, created: bool = False, **kwargs: Any) -> None:
    """A group renamed or deleted: its members' rights (and group names) changed."""
    if created:
        return
    members = sorted(instance.user_set.values_list("pk", flat=True))
    if members:
        publish_control("realtime.user_changed", {"users": members})


def _on_permission_deleted(sender: Any, instance: Permission, **kwargs: Any) -> None:
    """A permission deleted: those who held it directly or through a group lose it.

    Read before the delete, while its user and group links still exist (a
    cascade, such as deleting its content type, also sends ``pre_delete``
    for each permission). Superusers hold every permission anyway.
    """
    users = sorted(instance.user_set.values_list("pk", flat=True))
    groups = sorted(instance.group_set.values_list("name", flat=True))
    if users or groups:
        publish_control("realtime.user_changed", {"users": users, "groups": groups})


def connect() -> None:
    """Connect the receivers; called once from ``RealtimeConfig.ready()``."""
    User = get_user_model()
    post_save.connect(_on_log_entry_saved, sender=LogEntry, dispatch_uid="realtime.logentry")
    _wrap_log_actions()
    user_logged_out.connect(_on_logout, dispatch_uid="realtime.logout")
    post_save.connect(_on_user_saved, sender=User, dispatch_uid="realtime.user_saved")
    m2m_changed.connect(_on_rights_m2m, sender=User.groups.through, dispatch_uid="realtime.user_groups")
    m2m_changed.connect(_on_rights_m2m, sender=User.user_permissions.through, dispatch_uid="realtime.user_perms")
    m2m_changed.connect(_on_rights_m2m, sender=Group.permissions.through, dispatch_uid="realtime.group_perms")
    post_save.connect(_on_group_changed, sender=Group, dispatch_uid="realtime.group_saved")
    post_delete.connect(_on_user_deleted, sender=User, dispatch_uid="realtime.user_deleted")
    if apps.is_installed("django.contrib.sessions"):
        from django.contrib.sessions.models import Session

        post_delete.connect(_on_session_deleted, sender=Session, dispatch_uid="realtime.session_deleted")
    # Before the delete: afterwards the members can no longer be found.
    pre_delete.connect(_on_group_changed, sender=Group, dispatch_uid="realtime.group_deleted")
    pre_delete.connect(_on_permission_deleted, sender=Permission, dispatch_uid="realtime.permission_deleted")
