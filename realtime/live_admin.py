"""The live admin: model change events for every registered model, edit conflicts, lists that keep up.

``install()`` (from ``RealtimeConfig.ready()``) hooks three public seams of
``django.contrib.admin``, so that any registered ``ModelAdmin`` works with no
change to it:

- ``AdminSite.register`` connects ``realtime.changes``' receivers for each
  model registered;
- ``AdminSite.admin_view`` runs every admin view in
  ``realtime.changes.admin_request(request.user)``, so the changes made
  through the admin to its models publish ``model.change`` events that say
  who (changes made elsewhere publish only for models passed to ``track()``);
- ``ModelAdmin.get_form`` adds the stale-save check to change forms: the
  form carries the event id the page was rendered at (hidden field
  ``_realtime_seen``, rendered by realtime's ``admin/change_form.html``); a
  POST after which the object's ``model.change`` events show a newer change
  is refused with a form error, unless the user ticks "Save anyway"
  (``_realtime_overwrite``). An optimistic check, not a lock.

The admin's pages are made live by realtime's templates and
``static/realtime/admin-live.js``, from the state :func:`page_state` decides
once per request: a change form shows a notice when someone else saves or
deletes its object; a change list marks the rows others changed or deleted
since it was rendered and counts the changes; the index's Recent actions
and an object's history page add others' log entries (``admin.logentry``
events). When ``PRESENCE_TOPICS`` announces model topics (``["model:*"]``),
change forms and change lists also show who else has the same object or
list open, and since when.

A ``ModelAdmin`` with ``realtime_changes = False``, or
``REALTIME["MODEL_CHANGES"] = False``, turns all of it off.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from fnmatch import fnmatchcase
from typing import Any

from django import forms
from django.contrib.admin import ModelAdmin
from django.contrib.admin.sites import AdminSite, all_sites
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import ValidationError
from django.db.models import Model
from django.db.models.base import ModelBase
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.formats import time_format
from django.utils.text import capfirst

from realtime import changes
from realtime.conf import settings
from realtime.presence import online_connections

__all__ = [
    "OVERWRITE_FIELD",
    "PK_PLACEHOLDER",
    "SEEN_FIELD",
    "enabled_for",
    "install",
    "others_here",
    "page_state",
    "seen_position",
]

SEEN_FIELD = "_realtime_seen"
OVERWRITE_FIELD = "_realtime_overwrite"
_MAX_POSITION = 2**63 - 1
# Stands for an object's quoted primary key in a change list's change_url (no character admin's quote() escapes).
PK_PLACEHOLDER = "realtimepk0"


def enabled_for(model_admin: Any) -> bool:
    """Return True if the live admin serves ``model_admin``: setting on, not opted out, and not a
    ModelAdmin whose own code decides who may see each object (:func:`realtime.changes.decides_per_object`)."""
    return (
        bool(settings.MODEL_CHANGES)
        and getattr(model_admin, "realtime_changes", True) is not False
        and not changes.decides_per_object(model_admin)
    )


def seen_position(request: HttpRequest) -> int | None:
    """Return the event id this change form was first rendered at, or None if the POST carries a bad one.

    On a GET, :func:`realtime.changes.newest_position` (read once per
    request). On a POST (a form shown again with errors), the id the form
    came with, so that a refused save stays refused until the user reloads or
    confirms.
    """
    cached = getattr(request, "_realtime_seen", False)
    if cached is not False:
        return cached
    value: int | None
    if request.method == "POST" and SEEN_FIELD in request.POST:
        value = _parse_position(request.POST[SEEN_FIELD])
    else:
        value = changes.newest_position()
    request._realtime_seen = value  # type: ignore[attr-defined]
    return value


def _parse_position(text: str) -> int | None:
    text = text.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 19 or int(text) > _MAX_POSITION:
        return None
    return int(text)


def page_state(context: Any) -> dict[str, Any] | None:
    """What realtime's admin templates need on a live admin page, or None on other pages (and when off).

    Computed once per request. Every state has ``kind`` (``"form"``, ``"list"``,
    ``"index"`` or ``"history"``), ``me`` (the user's id), ``topics`` (the
    client's subscriptions) and ``last_id`` (the event id the page was
    rendered at, one query: what is committed after it is replayed). Besides:

    - ``"form"``, a change form: ``presence`` (whether ``PRESENCE_TOPICS``
      announces the object's topic), ``present`` (:func:`others_here`),
      ``topic`` (the object's), ``model`` (``app_label.model_name``), ``pk``
      (text), ``url`` (this change form), ``seen`` (the hidden field's value);
    - ``"list"``, a change list: ``presence``, ``present``, ``topic`` (the
      model's), ``model``, ``change_url`` (an object's change form, with
      :data:`PK_PLACEHOLDER` where its quoted primary key goes);
    - ``"history"``, an object's history page: ``model``, ``pk``;
    - ``"index"``, the admin's index: ``models``, the verbose names of the
      live models on it by ``app_label.model_name``.
    """
    request = context.get("request")
    if request is None or not settings.MODEL_CHANGES:
        return None
    if hasattr(request, "_realtime_page"):
        cached: dict[str, Any] | None = request._realtime_page
        return cached
    state: dict[str, Any] | None = None
    if context.get("adminform") is not None:
        state = _form_state(context, request)
    elif isinstance(context.get("cl"), ChangeList):
        state = _list_state(context["cl"], request)
    else:
        url_name = getattr(getattr(request, "resolver_match", None), "url_name", None) or ""
        obj = context.get("object")
        if url_name.endswith("_history") and isinstance(obj, Model) and "action_list" in context:
            state = _history_state(obj, request)
        elif url_name == "index" and isinstance(context.get("app_list"), list):
            state = _index_state(context["app_list"], request)
    request._realtime_page = state
    return state


def _presence(topic: str, me: Any) -> dict[str, Any]:
    announced = any(fnmatchcase(topic, pattern) for pattern in settings.PRESENCE_TOPICS)
    return {"presence": announced, "present": others_here(topic, me) if announced else []}


def _form_state(context: Any, request: HttpRequest) -> dict[str, Any] | None:
    adminform = context["adminform"]
    original = context.get("original")
    if original is None or not context.get("change"):
        return None
    model_admin = getattr(adminform, "model_admin", None)
    if not isinstance(original, Model) or not enabled_for(model_admin) or not changes.admin_tracks(type(original)):
        return None
    seen = seen_position(request)  # before presence: what joins or leaves after it is replayed
    topic = changes.model_topic(original)
    return {
        "kind": "form",
        **_presence(topic, request.user.pk),
        "me": request.user.pk,
        "topic": topic,
        "topics": [topic],
        "last_id": seen,
        "model": type(original)._meta.label_lower,
        "pk": str(original.pk),
        "url": request.path,
        "seen": "" if seen is None else str(seen),
    }


def _list_state(cl: ChangeList, request: HttpRequest) -> dict[str, Any] | None:
    model = cl.model
    if not enabled_for(cl.model_admin) or not changes.admin_tracks(model):
        return None
    position = changes.newest_position()  # before presence, as on the form
    topic = changes.model_topic(model)
    opts = model._meta
    change_url = reverse(
        f"{cl.model_admin.admin_site.name}:{opts.app_label}_{opts.model_name}_change", args=(PK_PLACEHOLDER,)
    )
    return {
        "kind": "list",
        **_presence(topic, request.user.pk),
        "me": request.user.pk,
        "topic": topic,
        "topics": [topic],
        "last_id": position,
        "model": opts.label_lower,
        "change_url": change_url,
    }


def _history_state(obj: Model, request: HttpRequest) -> dict[str, Any] | None:
    if not changes.admin_tracks(type(obj)):
        return None
    # admin.logentry events go to those who may view the model, without a topic.
    return {
        "kind": "history",
        "me": request.user.pk,
        "topics": [],
        "last_id": changes.newest_position(),
        "model": type(obj)._meta.label_lower,
        "pk": str(obj.pk),
    }


def _index_state(app_list: list[dict[str, Any]], request: HttpRequest) -> dict[str, Any] | None:
    models: dict[str, str] = {}
    for app in app_list:
        for entry in app.get("models", ()):
            model = entry.get("model")
            if isinstance(model, type) and issubclass(model, Model) and changes.admin_tracks(model):
                models[model._meta.label_lower] = capfirst(str(model._meta.verbose_name)) or ""
    if not models:
        return None
    return {
        "kind": "index",
        "me": request.user.pk,
        "topics": [],
        "last_id": changes.newest_position(),
        "models": models,
    }


def others_here(topic: str, me: Any) -> list[dict[str, Any]]:
    """Return the other users connected with ``topic`` now, earliest first: ``{"id", "username", "since"}`` (one query).

    ``since`` is when their first such connection was made (ISO 8601).
    """
    rows = (
        online_connections(topic)
        .exclude(user_id=me)
        .order_by("connected_at")
        .values_list("user_id", "username", "connected_at")
    )
    present: dict[int, dict[str, Any]] = {}
    for user_id, username, connected_at in rows:
        present.setdefault(user_id, {"id": user_id, "username": username, "since": connected_at.isoformat()})
    return list(present.values())


class StaleSaveCheck(forms.BaseForm):
    """Mixed into an admin change form: refuse a save that would overwrite a change made since the page loaded."""

    realtime_conflict: changes.Change | None = None
    _realtime_object: Model
    _realtime_seen: str
    _realtime_overwrite: bool

    def clean(self) -> dict[str, Any] | None:
        cleaned: dict[str, Any] | None = super().clean()  # None: Django keeps cleaned_data
        if self._realtime_overwrite:
            return cleaned
        seen = _parse_position(self._realtime_seen)
        if seen is None:
            raise ValidationError(
                "This form came with a broken version marker, so realtime cannot tell whether someone changed "
                "this object since: reload the page before saving.",
                code="realtime_bad_marker",
            )
        obj = self._realtime_object
        conflict = changes.changed_since(type(obj), obj.pk, seen)
        if conflict is None:
            return cleaned
        self.realtime_conflict = conflict
        name = obj._meta.verbose_name
        if conflict.action == "unknown" or conflict.at is None:
            message = (
                f"This page was opened too long ago to tell whether someone changed this {name} since. "
                "Reload the page to see the current version, or tick “Save anyway” and save again."
            )
        else:
            when = time_format(timezone.localtime(conflict.at), "H:i")
            who = conflict.actor or "Someone"
            verb = "deleted" if conflict.action == "deleted" else "changed"
            message = (
                f"{who} {verb} this {name} at {when}, after you opened this page: saving would overwrite "
                "that change. Reload the page to see it, or tick “Save anyway” and save again."
            )
        raise ValidationError(message, code="realtime_conflict")


def _checked_form(form: type[forms.BaseForm], obj: Model, seen: str, overwrite: bool) -> type[forms.BaseForm]:
    attrs = {
        "__module__": form.__module__,
        "_realtime_object": obj,
        "_realtime_seen": seen,
        "_realtime_overwrite": overwrite,
    }
    return type(form.__name__, (StaleSaveCheck, form), attrs)


def _models(model_or_iterable: Any) -> Iterable[Any]:
    return [model_or_iterable] if isinstance(model_or_iterable, ModelBase) else model_or_iterable


def install() -> None:
    """Hook the admin (idempotent); connect the models registered so far."""
    if getattr(AdminSite.register, "_realtime_wrapped", False):
        return
    original_register = AdminSite.register
    original_admin_view = AdminSite.admin_view
    original_get_form = ModelAdmin.get_form

    @functools.wraps(original_register)
    def register(self: AdminSite, model_or_iterable: Any, admin_class: Any = None, **options: Any) -> None:
        original_register(self, model_or_iterable, admin_class, **options)
        for model in _models(model_or_iterable):
            if enabled_for(self._registry.get(model)):
                changes.connect(model)

    @functools.wraps(original_admin_view)
    def admin_view(self: AdminSite, view: Callable[..., Any], cacheable: bool = False) -> Callable[..., Any]:
        inner = original_admin_view(self, view, cacheable)

        @functools.wraps(inner)
        def with_actor(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
            with changes.admin_request(lambda: getattr(request, "user", None)):
                return inner(request, *args, **kwargs)

        return with_actor

    @functools.wraps(original_get_form)
    def get_form(
        self: ModelAdmin[Any], request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any
    ) -> Any:
        form = original_get_form(self, request, obj, change, **kwargs)
        if (
            change
            and obj is not None
            and request.method == "POST"
            and SEEN_FIELD in request.POST
            and enabled_for(self)
            and changes.admin_tracks(type(obj))
        ):
            return _checked_form(form, obj, request.POST[SEEN_FIELD], request.POST.get(OVERWRITE_FIELD) == "yes")
        return form

    register._realtime_wrapped = True  # type: ignore[attr-defined]
    AdminSite.register = register  # type: ignore[method-assign]
    AdminSite.admin_view = admin_view  # type: ignore[method-assign, assignment]
    ModelAdmin.get_form = get_form  # type: ignore[method-assign]
    for site in all_sites:
        for model, model_admin in site._registry.items():
            if enabled_for(model_admin):
                changes.connect(model)
