"""Admin tools: who is online now, and a "Send a notification" action on users.

- "Online now" (``PresenceConnection``, read-only) lists one row per
  connection on a live worker. It needs the ``realtime.view_presence``
  permission (superusers hold it).
- ``send_notification`` is an admin action with an intermediate form that
  publishes a ``notification`` event to the selected users. It is added to
  the user admin when that is Django's stock ``UserAdmin``; a project with its
  own user admin adds it with ``actions = [send_notification]``. It needs
  the change permission on users.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin
from django.db import transaction
from django.db.models import QuerySet
from django.db.models.functions import Now
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.utils.translation import ngettext

from realtime.models import PresenceConnection
from realtime.outbox import publish

__all__ = [
    "NOTIFICATION_EVENT",
    "NotificationForm",
    "PresenceConnectionAdmin",
    "RealtimeUserAdmin",
    "send_notification",
]

if TYPE_CHECKING:  # django-stubs' generics; Django's classes are not subscriptable at run time
    _PresenceAdmin = admin.ModelAdmin[PresenceConnection]
    _AnyAdmin = admin.ModelAdmin[Any]
    _UserAdmin = UserAdmin[Any]
else:
    _PresenceAdmin = _AnyAdmin = admin.ModelAdmin
    _UserAdmin = UserAdmin

NOTIFICATION_EVENT = "notification"
VIEW_PRESENCE = "realtime.view_presence"


@admin.register(PresenceConnection)
class PresenceConnectionAdmin(_PresenceAdmin):
    """Read-only list of the connections on live workers ("Online now")."""

    list_display = ("username", "user_id", "worker_display", "connected_at", "client_ip", "topics_display")
    list_display_links = None
    search_fields = ("username", "client_ip")
    ordering = ("username", "connected_at")
    actions = None
    realtime_changes = False  # written by the workers, not edited: no live change events

    def get_queryset(self, request: HttpRequest) -> QuerySet[PresenceConnection]:
        rows = super().get_queryset(request).filter(worker__expires_at__gt=Now())
        return rows.select_related("worker").prefetch_related("subscriptions")

    @admin.display(description="worker", ordering="worker__hostname")
    def worker_display(self, connection: PresenceConnection) -> str:
        return f"{connection.worker.hostname} (pid {connection.worker.pid})"

    @admin.display(description="topics")
    def topics_display(self, connection: PresenceConnection) -> str:
        return ", ".join(sorted(s.topic for s in connection.subscriptions.all())) or "-"

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_active and request.user.has_perm(VIEW_PRESENCE)

    def has_module_permission(self, request: HttpRequest) -> bool:
        return self.has_view_permission(request)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class NotificationForm(forms.Form):
    """The message of a notification (required, at most 1,000 characters)."""

    message = forms.CharField(max_length=1000, widget=forms.Textarea(attrs={"rows": 4, "cols": 60}))


@admin.action(description="Send a notification", permissions=["change"])
def send_notification(modeladmin: _AnyAdmin, request: HttpRequest, queryset: QuerySet[Any]) -> Any:
    """Ask for a message, then publish ``notification`` to the selected users.

    The event's data is ``{"message": ..., "from": {"id", "username"}}``.
    """
    if "apply" in request.POST:
        form = NotificationForm(request.POST)
        if form.is_valid():
            user_ids = list(queryset.values_list("pk", flat=True))
            sender = request.user
            with transaction.atomic():
                publish(
                    NOTIFICATION_EVENT,
                    {
                        "message": form.cleaned_data["message"],
                        "from": {"id": sender.pk, "username": sender.get_username()},
                    },
                    users=user_ids,
                )
            count = len(user_ids)
            modeladmin.message_user(
                request,
                ngettext("Notification sent to %(count)d user.", "Notification sent to %(count)d users.", count)
                % {"count": count},
                messages.SUCCESS,
            )
            return None  # back to the change list
    else:
        form = NotificationForm()
    opts = modeladmin.model._meta
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": "Send a notification",
        "subtitle": None,
        "opts": opts,
        "form": form,
        "queryset": queryset,
        "action_checkbox_name": ACTION_CHECKBOX_NAME,
        "action_name": "send_notification",
        "media": modeladmin.media,
    }
    request.current_app = modeladmin.admin_site.name
    return TemplateResponse(request, "admin/realtime/send_notification.html", context)


class RealtimeUserAdmin(_UserAdmin):
    """Django's ``UserAdmin`` with the "Send a notification" action."""

    actions = [send_notification]


def _install_user_action() -> None:
    User = get_user_model()
    if admin.site.is_registered(User) and type(admin.site.get_model_admin(User)) is UserAdmin:
        admin.site.unregister(User)
        admin.site.register(User, RealtimeUserAdmin)


_install_user_action()
