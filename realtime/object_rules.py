"""Who may see one object through the admin, when a ModelAdmin's own code decides it.

A ``ModelAdmin`` that overrides ``has_view_permission``,
``has_change_permission`` or ``get_queryset`` decides per object who sees
what; the model's permissions alone would tell others of objects it hides.
For such models the change events of :mod:`realtime.changes` are addressed
at publish time, in the change's transaction, to exactly the users the admin
would show the object to now: :func:`allowed_users`.

"Would show" is what the admin's change view checks, for every admin site
registering the model (any one suffices): the site lets the user in
(``AdminSite.has_permission``: active staff by default), the ModelAdmin's
``has_view_or_change_permission(request, obj)`` is true and, when
``get_queryset`` is overridden, the object is in the user's queryset. The
candidates are active staff users who hold the model's view or change
permission (or are superusers): one query, then the rules once per
candidate, with a request that carries only ``user``. A rule that raises
refuses that user (and is logged).

What it costs is the rules' own cost times the candidates, once per change:
fine for the tens or hundreds of staff users an admin has, not for rules
that are slow per call.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from django.apps import apps
from django.contrib.auth import get_backends, get_permission_codename, get_user_model
from django.db.models import Model, Q
from django.http import HttpRequest

__all__ = ["allowed_users", "decides_per_object", "object_admins"]

logger = logging.getLogger("realtime.object_rules")


def decides_per_object(model_admin: Any) -> bool:
    """Return True if ``model_admin`` overrides ``has_view_permission``, ``has_change_permission``
    or ``get_queryset``: its own code then decides who sees each object."""
    from django.contrib.admin import ModelAdmin

    if not isinstance(model_admin, ModelAdmin):
        return False  # not registered (AdminSite.register skips swapped models), or not an admin
    cls = type(model_admin)
    return (
        cls.has_view_permission is not ModelAdmin.has_view_permission
        or cls.has_change_permission is not ModelAdmin.has_change_permission
        or cls.get_queryset is not ModelAdmin.get_queryset
    )


def object_admins(model: type[Model]) -> list[Any]:
    """Return the ModelAdmins registering ``model`` in every admin site if any of them
    :func:`decides_per_object`, else []."""
    if not apps.is_installed("django.contrib.admin"):
        return []
    from django.contrib.admin.sites import all_sites

    admins = [site._registry[model] for site in all_sites if model in site._registry]
    return admins if any(decides_per_object(model_admin) for model_admin in admins) else []


def allowed_users(model_admins: Iterable[Any], obj: Model) -> list[int]:
    """Return the ids of the users any of ``model_admins`` would show ``obj`` to now, ascending (sync, ORM).

    Call it while ``obj``'s row exists (before a delete), in the change's
    transaction, so that ``get_queryset`` sees what the change made.
    """
    model_admins = list(model_admins)
    allowed = []
    for user in _candidates(type(obj)):
        request = HttpRequest()
        request.user = user
        if any(_shows(model_admin, request, obj) for model_admin in model_admins):
            allowed.append(user.pk)
    return allowed


def _shows(model_admin: Any, request: HttpRequest, obj: Model) -> bool:
    from django.contrib.admin import ModelAdmin

    try:
        if not model_admin.admin_site.has_permission(request):
            return False
        if not model_admin.has_view_or_change_permission(request, obj):
            return False
        if type(model_admin).get_queryset is ModelAdmin.get_queryset:
            return True
        return bool(model_admin.get_queryset(request).filter(pk=obj.pk).exists())
    except Exception:
        logger.exception(
            "%s refused user %s for %s %r: its permission code raised",
            type(model_admin).__name__,
            request.user.pk,
            obj._meta.label_lower,
            obj.pk,
        )
        return False


def _candidates(model: type[Model]) -> list[Any]:
    """Active staff users holding ``model``'s view or change permission, or superusers (one query).

    With one authentication backend that can list them (``ModelBackend``);
    otherwise every active staff user, and the rules decide.
    """
    user_model = get_user_model()
    manager = user_model._default_manager
    names = {field.name for field in user_model._meta.get_fields()}
    queryset = manager.all()
    backends = get_backends()
    if len(backends) == 1 and hasattr(backends[0], "with_perm"):
        opts = model._meta
        holders = Q()
        for action in ("view", "change"):
            permission = f"{opts.app_label}.{get_permission_codename(action, opts)}"
            holders |= Q(pk__in=backends[0].with_perm(permission, is_active=True).values("pk"))
        queryset = queryset.filter(holders)
    elif "is_active" in names:
        queryset = queryset.filter(is_active=True)
    if "is_staff" in names:
        queryset = queryset.filter(is_staff=True)
    return list(queryset.order_by("pk"))
