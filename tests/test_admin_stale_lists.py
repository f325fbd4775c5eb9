"""A change list's inline edits (list_editable) and the delete page refuse to overwrite others' changes."""

from __future__ import annotations

import contextlib
import re

import pytest
from django.contrib.auth.admin import GroupAdmin
from django.contrib.auth.models import Group

from tests.helpers import live_admin_state, logged_in, make_user
from tests.object_rules import group_admin_class

pytestmark = pytest.mark.django_db(transaction=True)

LIST = "/admin/auth/group/"


class EditableGroups(GroupAdmin):
    list_display = ("id", "name")
    list_display_links = ("id",)
    list_editable = ("name",)
    ordering = ("id",)


def editable_list() -> contextlib.AbstractContextManager[None]:
    """Within this block the admin's group list edits names inline."""
    return group_admin_class(EditableGroups)


def rendered_seen(client) -> str:
    page = client.get(LIST).content.decode()
    (seen,) = re.findall(r'name="_realtime_seen" value="(\d+)"', page)
    return seen


def list_post(names: dict[int, str], seen: str, **extra: str) -> dict[str, str]:
    data = {
        "form-TOTAL_FORMS": str(len(names)),
        "form-INITIAL_FORMS": str(len(names)),
        "form-MIN_NUM_FORMS": "0",
        "form-MAX_NUM_FORMS": "1000",
        "_save": "Save",
        "_realtime_seen": seen,
        **extra,
    }
    for index, (pk, name) in enumerate(names.items()):
        data[f"form-{index}-id"] = str(pk)
        data[f"form-{index}-name"] = name
    return data


def test_inline_edit_of_a_row_someone_changed_since_is_refused_unless_confirmed():
    me = logged_in(make_user("me", staff=True, superuser=True))
    editor = logged_in(make_user("editor", staff=True, superuser=True))
    night = Group.objects.create(name="Night").pk
    day = Group.objects.create(name="Day").pk
    with editable_list():
        seen = rendered_seen(me)
        assert editor.post(f"{LIST}{night}/change/", {"name": "Night (editor)"}).status_code == 302

        # Editing only "Day" still posts "Night" as it was shown: saving would quietly undo the editor's rename.
        response = me.post(LIST, list_post({night: "Night", day: "Day (me)"}, seen))
        assert response.status_code == 200
        text = response.content.decode()
        assert re.search(r"editor changed this group at \d\d:\d\d, after you opened this page", text), text
        assert 'name="_realtime_overwrite"' in text
        assert f'name="_realtime_seen" value="{seen}"' in text  # a plain retry stays refused
        assert Group.objects.get(pk=night).name == "Night (editor)"
        assert Group.objects.get(pk=day).name == "Day"  # nothing saved

        response = me.post(LIST, list_post({night: "Night (me)", day: "Day (me)"}, seen, _realtime_overwrite="yes"))
        assert response.status_code == 302
        assert Group.objects.get(pk=night).name == "Night (me)"

        # Nothing changed by others since a fresh page: the save goes through, a row left as it was too.
        seen = rendered_seen(me)
        response = me.post(LIST, list_post({night: "Night (me)", day: "Day (again)"}, seen))
        assert response.status_code == 302
        assert Group.objects.get(pk=day).name == "Day (again)"


def test_inline_edit_with_a_broken_marker_is_refused_and_without_one_is_not_checked():
    me = logged_in(make_user("me", staff=True, superuser=True))
    night = Group.objects.create(name="Night").pk
    with editable_list():
        response = me.post(LIST, list_post({night: "Night 2"}, "not-a-number"))
        assert response.status_code == 200
        assert "This form came with a broken version marker" in response.content.decode()
        data = list_post({night: "Night 3"}, "0")
        del data["_realtime_seen"]
        assert me.post(LIST, data).status_code == 302
    assert Group.objects.get(pk=night).name == "Night 3"


def test_a_delete_confirmed_before_someone_elses_change_is_asked_again():
    """The delete page carries the event id it was rendered at; a change by someone else after it
    sends the user back to the page, as it is now, with a message saying who changed what."""
    me = logged_in(make_user("me", staff=True, superuser=True))
    editor = logged_in(make_user("editor", staff=True, superuser=True))
    group = Group.objects.create(name="Night")
    url = f"{LIST}{group.pk}/delete/"
    state = live_admin_state(me.get(url))
    assert (state["kind"], state["topics"], state["topic"]) == (
        "delete",
        [f"model:auth.group:{group.pk}"],
        state["topic"],
    )
    assert editor.post(f"{LIST}{group.pk}/change/", {"name": "Night (keep!)"}).status_code == 302

    response = me.post(url, {"post": "yes", "_realtime_seen": state["seen"]}, follow=True)
    assert response.redirect_chain == [(url, 302)]
    assert Group.objects.filter(pk=group.pk).exists()
    text = response.content.decode()
    assert re.search(
        r"This group was changed by editor at \d\d:\d\d, after you opened this page: check what you are deleting", text
    )
    assert "Night (keep!)" in text  # the page as it is now

    # Confirmed again from the page as it is now: deleted.
    again = live_admin_state(response)["seen"]
    assert int(again) > int(state["seen"])
    assert me.post(url, {"post": "yes", "_realtime_seen": again}).status_code == 302
    assert not Group.objects.filter(pk=group.pk).exists()


def test_a_delete_with_a_broken_marker_is_asked_again_and_without_one_is_not_checked():
    me = logged_in(make_user("me", staff=True, superuser=True))
    group = Group.objects.create(name="Night")
    url = f"{LIST}{group.pk}/delete/"
    response = me.post(url, {"post": "yes", "_realtime_seen": "x"}, follow=True)
    assert "This page came with a broken version marker" in response.content.decode()
    assert Group.objects.filter(pk=group.pk).exists()
    assert me.post(url, {"post": "yes"}).status_code == 302
    assert not Group.objects.filter(pk=group.pk).exists()
