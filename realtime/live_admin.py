"""The live admin: model change events for every registered model, edit conflicts, lists that keep up.

``install()`` (from ``RealtimeConfig.ready()``) hooks public seams of
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
  (``_realtime_overwrite``). An optimistic check, not a lock;
- ``ModelAdmin.get_changelist_form`` adds the same check to each changed row
  of a ``list_editable`` change list (the list template renders the field);
- ``ModelAdmin.delete_view`` sends a delete confirmed on a page rendered
  before someone else's change back to the page, as it is now, with a
  message (:func:`stale_delete`; ``admin-live.js`` adds the field to the form).

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
from django.contrib import messages
from django.contrib.admin import ModelAdmin
from django.contrib.admin.sites import AdminSite, all_sites
from django.contrib.admin.utils import unquote
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Model
from django.db.models.base import ModelBase
from django.http import HttpRequest, HttpResponseRedirect
from django.urls import reverse
from django.utils import timezone
from django.utils.formats import time_format
from django.utils.text import capfirst

from realtime import changes
from realtime.conf import settings
from realtime.object_rules import decides_per_object
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
    "stale_delete",
]

SEEN_FIELD = "_realtime_seen"
OVERWRITE_FIELD = "_realtime_overwrite"
_MAX_POSITION = 2**63 - 1
# Stands for an object's quoted primary key in a change list's change_url (no character admin's quote() escapes).
PK_PLACEHOLDER = "realtimepk0"


def enabled_for(model_admin: Any) -> bool:
    """Return True if the live admin serves ``model_admin``: setting on, and not opted out."""
    return bool(settings.MODEL_CHANGES) and getattr(model_admin, "realtime_changes", True) is not False


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
        elif url_name.endswith("_delete") and isinstance(obj, Model) and "deleted_objects" in context:
            state = _delete_state(obj, getattr(request, "_realtime_model_admin", None), request)
        elif url_name == "index" and isinstance(context.get("app_list"), list):
            state = _index_state(context["app_list"], request)
    request._realtime_page = state
    return state


def _subscription(model: type[Model], topic: str, me: Any, *, presence: bool = True) -> dict[str, Any]:
    """The page's topics and who else is here (if ``presence``); for a model decided per object, neither:
    its events come addressed to the user, and who views an object is not shown (the worker does not
    evaluate the rules)."""
    if changes.decided_per_object(model):
        return {"topics": [], "presence": False, "present": []}
    announced = presence and any(fnmatchcase(topic, pattern) for pattern in settings.PRESENCE_TOPICS)
    return {"topics": [topic], "presence": announced, "present": others_here(topic, me) if announced else []}


def _form_state(context: Any, request: HttpRequest) -> dict[str, Any] | None:
    adminform = context["adminform"]
    original = context.get("original")
    if original is None or not context.get("change"):
        return None
    model_admin = getattr(adminform, "model_admin", None)
    if not isinstance(original, Model) or not enabled_for(model_admin) or not changes.admin_tracks(type(original)):
        return None
    return _object_page("form", original, request, presence=True)


def _object_page(kind: str, obj: Model, request: HttpRequest, *, presence: bool) -> dict[str, Any]:
    """The state of a page about one object (a change form, a delete page)."""
    seen = seen_position(request)  # before presence: what joins or leaves after it is replayed
    topic = changes.model_topic(obj)
    return {
        "kind": kind,
        **_subscription(type(obj), topic, request.user.pk, presence=presence),
        "me": request.user.pk,
        "topic": topic,
        "last_id": seen,
        "model": type(obj)._meta.label_lower,
        "pk": str(obj.pk),
        "url": request.path,
        "seen": "" if seen is None else str(seen),
    }


def _list_state(cl: ChangeList, request: HttpRequest) -> dict[str, Any] | None:
    model = cl.model
    if not enabled_for(cl.model_admin) or not changes.admin_tracks(model):
        return None
    position = seen_position(request)  # before presence, as on the form
    topic = changes.model_topic(model)
    opts = model._meta
    change_url = reverse(
        f"{cl.model_admin.admin_site.name}:{opts.app_label}_{opts.model_name}_change", args=(PK_PLACEHOLDER,)
    )
    return {
        "kind": "list",
        **_subscription(model, topic, request.user.pk),
        "me": request.user.pk,
        "topic": topic,
        "last_id": position,
        "model": opts.label_lower,
        "change_url": change_url,
        "seen": "" if position is None else str(position),
        "conflict": any(getattr(form, "realtime_conflict", None) for form in getattr(cl.formset, "forms", None) or ()),
    }


def _delete_state(obj: Model, model_admin: Any, request: HttpRequest) -> dict[str, Any] | None:
    if not enabled_for(model_admin) or not changes.admin_tracks(type(obj)):
        return None
    return _object_page("delete", obj, request, presence=False)


def stale_delete(model_admin: Any, request: HttpRequest, object_id: str) -> str | None:
    """Return why a confirmed delete must be confirmed again, or None to let it go on (sync, one query or two).

    A delete confirmed on a page rendered before someone else changed the
    object: the user confirmed what they saw, not what is there now.
    """
    if request.method != "POST" or SEEN_FIELD not in request.POST or not enabled_for(model_admin):
        return None
    if not changes.admin_tracks(model_admin.model):
        return None
    seen = _parse_position(request.POST[SEEN_FIELD])
    if seen is None:
        return "This page came with a broken version marker: check the object and confirm again."
    try:
        obj = model_admin.get_object(request, unquote(object_id))
    except (ValidationError, ValueError):
        return None  # Django's own view answers for an id it cannot read
    if obj is None:
        return None
    conflict = changes.changed_since(type(obj), obj.pk, seen)
    if conflict is None or conflict.action == "deleted":
        return None
    name = obj._meta.verbose_name
    if conflict.action == "unknown" or conflict.at is None:
        return (
            f"This page was opened too long ago to tell whether someone changed this {name} since: "
            "check it and confirm again."
        )
    when = time_format(timezone.localtime(conflict.at), "H:i")
    # Not "editor changed ...": Django's message list capitalizes the first letter, and usernames have case.
    return (
        f"This {name} was changed by {conflict.actor or 'someone'} at {when}, after you opened this page: "
        "check what you are deleting and confirm again."
    )


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
    _realtime_object: Model | None  # None: each form's own instance (a change list's rows)
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
        if obj is None:  # a row of a change list's list_editable formset
            obj = getattr(self, "instance", None)
            if obj is None or obj.pk is None or not self.has_changed():
                return cleaned  # a row left as it was is not saved
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


def _checked_form(form: type[forms.BaseForm], obj: Model | None, seen: str, overwrite: bool) -> type[forms.BaseForm]:
    attrs = {
        "__module__": form.__module__,
        "_realtime_object": obj,
        "_realtime_seen": seen,
        "_realtime_overwrite": overwrite,
    }
    return type(form.__name__, (StaleSaveCheck, form), attrs)


def _object_rules_anywhere() -> bool:
    return any(decides_per_object(model_admin) for site in all_sites for model_admin in site._registry.values())


def _models(model_or_iterable: Any) -> Iterable[Any]:
    return [model_or_iterable] if isinstance(model_or_iterable, ModelBase) else model_or_iterable


def install() -> None:
    """Hook the admin (idempotent); connect the models registered so far."""
    if getattr(AdminSite.register, "_realtime_wrapped", False):
        return
    original_register = AdminSite.register
    original_admin_view = AdminSite.admin_view
    original_get_form = ModelAdmin.get_form
    original_get_changelist_form = ModelAdmin.get_changelist_form
    original_delete_view = ModelAdmin.delete_view

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
                if request.method == "POST" and _object_rules_anywhere():
                    # Decide who sees each changed object once the view is done, still in its transaction.
                    with transaction.atomic(), changes.deferred_object_changes():
                        return inner(request, *args, **kwargs)
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

    @functools.wraps(original_get_changelist_form)
    def get_changelist_form(self: ModelAdmin[Any], request: HttpRequest, **kwargs: Any) -> Any:
        form = original_get_changelist_form(self, request, **kwargs)
        if (
            request.method == "POST"
            and SEEN_FIELD in request.POST
            and enabled_for(self)
            and changes.admin_tracks(self.model)
        ):
            return _checked_form(form, None, request.POST[SEEN_FIELD], request.POST.get(OVERWRITE_FIELD) == "yes")
        return form

    @functools.wraps(original_delete_view)
    def delete_view(
        self: ModelAdmin[Any], request: HttpRequest, object_id: str, extra_context: dict[str, Any] | None = None
    ) -> Any:
        refusal = stale_delete(self, request, object_id)
        if refusal is not None:
            messages.warning(request, refusal)
            return HttpResponseRedirect(request.get_full_path())  # the page again, as it is now
        request._realtime_model_admin = self  # type: ignore[attr-defined]  # for page_state()
        return original_delete_view(self, request, object_id, extra_context)

    register._realtime_wrapped = True  # type: ignore[attr-defined]
    AdminSite.register = register  # type: ignore[method-assign]
    AdminSite.admin_view = admin_view  # type: ignore[method-assign, assignment]
    ModelAdmin.get_form = get_form  # type: ignore[method-assign]
    ModelAdmin.get_changelist_form = get_changelist_form  # type: ignore[method-assign]
    ModelAdmin.delete_view = delete_view  # type: ignore[method-assign]
    for site in all_sites:
        for model, model_admin in site._registry.items():
            if enabled_for(model_admin):
                changes.connect(model)
