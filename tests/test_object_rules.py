"""A ModelAdmin with object-level rules: its changes reach exactly the users it would show the object to.

``tests.object_rules.OwnGroupsOnly`` lets staff see only the groups named after them (superusers
see all), through ``has_view_permission``/``has_change_permission`` and ``get_queryset``; the
worker is started with the same admin (``tests.object_rules_settings``).
"""

from __future__ import annotations

import json
import logging

import pytest
from django.contrib.admin import ModelAdmin
from django.contrib.admin import site as admin_site
from django.contrib.auth.admin import GroupAdmin
from django.contrib.auth.models import Group, Permission

from realtime import changes, live_admin, object_rules
from realtime.models import Event
from tests.helpers import (
    assert_nothing_more,
    get_token,
    live_admin_state,
    logged_in,
    make_user,
    open_ws,
    receive,
    receive_events,
    start_worker,
)
from tests.object_rules import OwnGroupsOnly, group_admin_class, group_rules

pytestmark = pytest.mark.django_db(transaction=True)

GROUPS = "model:auth.group"
GROUP_PERMS = ("auth.view_group", "auth.change_group", "auth.delete_group", "auth.add_group")


@pytest.fixture
def people():
    """root (superuser), alice and bob (staff who may manage groups), and three who may not see them."""
    people = {
        "root": make_user("root", staff=True, superuser=True),
        "alice": make_user("alice", staff=True, perms=GROUP_PERMS),
        "bob": make_user("bob", staff=True, perms=("auth.change_group",)),
        "carol": make_user("carol", staff=True, perms=("auth.view_user",)),  # no group permission
        "alice2": make_user("alice2", perms=GROUP_PERMS),  # not staff: no admin at all
    }
    retired = make_user("alice_retired", staff=True, perms=GROUP_PERMS)
    retired.is_active = False
    retired.save()
    return people


def audiences(name: str) -> list[tuple[str, list[int]]]:
    return [(event.topic, event.users) for event in Event.objects.filter(name=name).order_by("id")]


def test_model_admin_overrides_that_decide_per_object():
    class ListsOwnOnly(ModelAdmin):  # type: ignore[type-arg]
        def get_queryset(self, request):  # type: ignore[no-untyped-def]
            return super().get_queryset(request).filter(name__startswith=request.user.username)

    assert object_rules.decides_per_object(OwnGroupsOnly(Group, admin_site))
    assert object_rules.decides_per_object(ListsOwnOnly(Group, admin_site))
    assert not object_rules.decides_per_object(ModelAdmin(Group, admin_site))
    assert not object_rules.decides_per_object(None)  # a model AdminSite.register skipped (swapped)
    assert not changes.decided_per_object(Group)
    with group_rules():
        assert changes.decided_per_object(Group)
        assert changes.admin_tracks(Group)  # live, but addressed per object
        assert changes.topic_permissions(GROUPS) == () and changes.topic_permissions(f"{GROUPS}:1") == ()
    assert changes.topic_permissions(GROUPS) == ("auth.view_group", "auth.change_group")


def test_admin_changes_are_addressed_to_who_may_see_the_object(people):
    """Add, rename (the object moves from alice's to bob's) and delete through the admin: each
    model.change and admin.logentry goes to the users the admin shows the object to at that moment,
    decided in the change's transaction (before the row goes, for a delete)."""
    root, alice, bob = people["root"], people["alice"], people["bob"]
    admin = logged_in(root)
    with group_rules():
        assert admin.post("/admin/auth/group/add/", {"name": "alice plans"}).status_code == 302
        group = Group.objects.get(name="alice plans")
        topics = [GROUPS, f"{GROUPS}:{group.pk}"]
        assert audiences("model.change") == [(topic, sorted([root.pk, alice.pk])) for topic in topics]
        assert audiences("admin.logentry") == [(None, sorted([root.pk, alice.pk]))]
        Event.objects.all().delete()

        assert admin.post(f"/admin/auth/group/{group.pk}/change/", {"name": "bob plans"}).status_code == 302
        assert audiences("model.change") == [(topic, sorted([root.pk, bob.pk])) for topic in topics]
        assert audiences("admin.logentry") == [(None, sorted([root.pk, bob.pk]))]
        Event.objects.all().delete()

        assert admin.post(f"/admin/auth/group/{group.pk}/delete/", {"post": "yes"}).status_code == 302
        assert not Group.objects.filter(pk=group.pk).exists()
        assert audiences("model.change") == [(topic, sorted([root.pk, bob.pk])) for topic in topics]
        assert audiences("admin.logentry") == [(None, sorted([root.pk, bob.pk]))]
        (change, _) = Event.objects.filter(name="model.change")
        assert (change.data["action"], change.data["repr"]) == ("deleted", "bob plans")


def test_the_actor_always_gets_the_log_entry_of_what_they_did(people):
    """alice may add a group she then cannot see (not named after her): the change goes to root only,
    and her own log entry to her and root."""
    root, alice = people["root"], people["alice"]
    with group_rules():
        assert logged_in(alice).post("/admin/auth/group/add/", {"name": "shared"}).status_code == 302
    assert [users for _, users in audiences("model.change")] == [[root.pk], [root.pk]]
    assert audiences("admin.logentry") == [(None, sorted([root.pk, alice.pk]))]


def test_a_rule_that_raises_refuses_that_user_and_the_save_still_commits(people, caplog):
    root, alice = people["root"], people["alice"]

    class Broken(OwnGroupsOnly):
        def has_view_permission(self, request, obj=None):  # type: ignore[no-untyped-def]
            if request.user.username == "alice":
                raise RuntimeError("rule bug")
            return super().has_view_permission(request, obj)

    with group_admin_class(Broken), caplog.at_level(logging.ERROR, logger="realtime.object_rules"):
        assert logged_in(root).post("/admin/auth/group/add/", {"name": "alice broken"}).status_code == 302
    assert Group.objects.filter(name="alice broken").exists()
    assert [users for _, users in audiences("model.change")] == [[root.pk], [root.pk]]
    assert f"Broken refused user {alice.pk} for auth.group" in caplog.text


def test_live_pages_of_such_a_model_subscribe_to_nothing_and_still_refuse_a_stale_save(people):
    """alice's change form is live (its events come addressed to her) but subscribes to no topic and
    shows no presence; root's change after she opened it makes her save stale."""
    root, alice = people["root"], people["alice"]
    group = Group.objects.create(name="alice plans")
    with group_rules():
        state = live_admin_state(logged_in(alice).get(f"/admin/auth/group/{group.pk}/change/"))
        assert state is not None
        assert (state["kind"], state["topics"], state["presence"], state["topic"]) == (
            "form",
            [],
            False,
            f"{GROUPS}:{group.pk}",
        )
        response = logged_in(root).post(f"/admin/auth/group/{group.pk}/change/", {"name": "alice plans 2"})
        assert response.status_code == 302
        response = logged_in(alice).post(
            f"/admin/auth/group/{group.pk}/change/", {"name": "alice mine", live_admin.SEEN_FIELD: state["seen"]}
        )
        assert response.status_code == 200
        assert "root changed this group at" in response.content.decode()
        assert Group.objects.get(pk=group.pk).name == "alice plans 2"
        # bob cannot open it at all: the admin says it does not exist.
        bob_page = logged_in(people["bob"]).get(f"/admin/auth/group/{group.pk}/change/")
        assert bob_page.status_code == 302


def test_the_worker_refuses_the_topics_and_delivers_to_the_allowed_users_only(people):
    """End to end: alice's and bob's connections may not subscribe to the model's topics (anyone
    holding one would receive every event published there); root's change to alice's group reaches
    alice, and bob, who holds the model permission but not that object, learns nothing."""
    root, alice, bob = people["root"], people["alice"], people["bob"]
    group = Group.objects.create(name="alice plans")
    worker = start_worker(extra_env={"DJANGO_SETTINGS_MODULE": "tests.object_rules_settings"})
    try:
        ws_alice, _ = open_ws(worker, get_token(logged_in(alice)), topics=[GROUPS])
        assert receive(ws_alice) == {"type": "unsubscribed", "topic": GROUPS}
        ws_bob, _ = open_ws(worker, get_token(logged_in(bob)))
        ws_bob.send(json.dumps({"type": "subscribe", "topic": f"{GROUPS}:{group.pk}"}))
        refusal = receive(ws_bob)
        assert (refusal["type"], refusal["code"]) == ("error", "forbidden")

        with group_rules():
            admin = logged_in(root)
            assert admin.post(f"/admin/auth/group/{group.pk}/change/", {"name": "alice plans (v2)"}).status_code == 302
        events = receive_events(ws_alice, 3)
        assert [(e["event"], e.get("topic")) for e in events] == [
            ("model.change", GROUPS),
            ("model.change", f"{GROUPS}:{group.pk}"),
            ("admin.logentry", None),
        ]
        assert events[0]["data"]["repr"] == "alice plans (v2)"
        assert_nothing_more(ws_bob, bob)
        assert_nothing_more(ws_alice, alice)
        ws_alice.close()
        ws_bob.close()
    finally:
        worker.stop()


class ByPermission(GroupAdmin):
    """Staff see only the groups that hold the "view user" permission: a rule on a many-to-many
    field, which the admin saves after the group itself."""

    def has_view_permission(self, request, obj=None):  # type: ignore[no-untyped-def]
        return self._readable(super().has_view_permission(request, obj), request, obj)

    def has_change_permission(self, request, obj=None):  # type: ignore[no-untyped-def]
        return self._readable(super().has_change_permission(request, obj), request, obj)

    def _readable(self, allowed, request, obj):  # type: ignore[no-untyped-def]
        if obj is None or request.user.is_superuser:
            return allowed
        return allowed and obj.permissions.filter(codename="view_user").exists()


def test_rules_see_the_object_as_the_admin_view_left_it(people):
    """The admin saves a group's permissions after the group: the audience is decided when the view
    is done (still in its transaction), so alice gets the group created with the permission, and
    not the change that takes it away (nor bob, who may change groups); one decision serves the
    change and its log entry."""
    root, alice, bob = people["root"], people["alice"], people["bob"]
    view_user = Permission.objects.get(codename="view_user").pk
    admin = logged_in(root)
    with group_admin_class(ByPermission):
        assert admin.post("/admin/auth/group/add/", {"name": "Readers", "permissions": [view_user]}).status_code == 302
        group = Group.objects.get(name="Readers")
        readers = sorted([root.pk, alice.pk, bob.pk])
        assert [users for _, users in audiences("model.change")] == [readers] * 2
        assert audiences("admin.logentry") == [(None, readers)]
        Event.objects.all().delete()

        response = admin.post(f"/admin/auth/group/{group.pk}/change/", {"name": "Readers", "permissions": []})
        assert response.status_code == 302
        assert not group.permissions.exists()
        assert [users for _, users in audiences("model.change")] == [[root.pk]] * 2
        assert audiences("admin.logentry") == [(None, [root.pk])]
