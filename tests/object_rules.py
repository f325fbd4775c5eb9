"""A GroupAdmin with object-level rules, for tests: a staff user sees only the groups named after them.

The stock admin site's ``GroupAdmin`` instance is given this class in place
(its URLs are bound to that instance), in the test process by
:func:`group_rules` and in a worker process by ``tests.object_rules_app`` through
``tests.object_rules_settings``, so both sides decide alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from django.contrib import admin
from django.contrib.auth.admin import GroupAdmin
from django.contrib.auth.models import Group


class OwnGroupsOnly(GroupAdmin):
    """Superusers see every group; other staff only the groups whose name starts with their username."""

    def has_view_permission(self, request: Any, obj: Any = None) -> bool:
        allowed = super().has_view_permission(request, obj)
        return allowed and (obj is None or _own(request.user, obj.name))

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        allowed = super().has_change_permission(request, obj)
        return allowed and (obj is None or _own(request.user, obj.name))

    def get_queryset(self, request: Any) -> Any:
        queryset = super().get_queryset(request)
        return queryset if request.user.is_superuser else queryset.filter(name__startswith=request.user.username)


def _own(user: Any, name: str) -> bool:
    return bool(user.is_superuser or name.startswith(user.get_username()))


@contextlib.contextmanager
def group_admin_class(cls: type[GroupAdmin]) -> Iterator[None]:
    """Within this block the admin site's GroupAdmin instance is of class ``cls`` (its URLs are bound to it)."""
    model_admin = admin.site._registry[Group]
    original = type(model_admin)
    model_admin.__class__ = cls
    try:
        yield
    finally:
        model_admin.__class__ = original


def group_rules() -> contextlib.AbstractContextManager[None]:
    """Within this block the admin site's GroupAdmin has :class:`OwnGroupsOnly`'s rules."""
    return group_admin_class(OwnGroupsOnly)
