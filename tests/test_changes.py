"""Model change events: published in the change's transaction, to model topics only permitted users may hold."""

from __future__ import annotations

import json
import re

import pytest
from django.contrib.admin import site as admin_site
from django.contrib.auth.models import Group, Permission
from django.db import transaction
from django.test import override_settings

import realtime
from realtime import changes, topics
from realtime.core.audience import Identity
from realtime.models import Event
from tests.helpers import (
    assert_nothing_more,
    get_token,
    logged_in,
    make_user,
    open_ws,
    receive,
    receive_events,
    start_worker,
)

pytestmark = pytest.mark.django_db(transaction=True)

GROUPS = "model:auth.group"


def identity(*, perms: tuple[str, ...] = (), superuser: bool = False) -> Identity:
    return Identity(1, "u", "h", True, superuser, frozenset(), frozenset(perms))


def subscribe(ws, topic: str) -> dict:
    ws.send(json.dumps({"type": "subscribe", "topic": topic}))
    return receive(ws)


@pytest.mark.parametrize(
    ("topic", "perms", "superuser", "allowed"),
    [
        (GROUPS, ("auth.view_group",), False, True),
        (GROUPS + ":7", ("auth.view_group",), False, True),
        (GROUPS + ":7", ("auth.change_group",), False, True),
        (GROUPS + ":7", ("auth.add_group", "auth.delete_group", "auth.view_user"), False, False),
        (GROUPS, (), True, True),
        ("model:auth.Group", ("auth.view_group",), False, False),  # labels are lower case
        ("model:auth.nothing", (), True, False),  # no such model: nobody, superusers included
        ("model:nothing", (), True, False),
        ("model:", (), True, False),
        (GROUPS + ":", (), True, False),
    ],
)
def test_model_topics_are_decided_by_permission(topic, perms, superuser, allowed):
    """A model topic needs the model's view or change permission; malformed or unknown ones are refused."""
    assert topics.can_subscribe(identity(perms=perms, superuser=superuser), topic) is allowed


@pytest.mark.parametrize("patterns", [{"*": None}, {"model:*": None}, {"room:*": None}, {}])
def test_topics_patterns_do_not_decide_model_topics(patterns):
    """Whatever TOPICS says, model topics follow permissions (allowing ``*`` to all does not leak them)."""
    with override_settings(REALTIME={"TOPICS": patterns}):
        assert topics.can_subscribe(identity(), GROUPS) is False
        assert topics.can_subscribe(identity(perms=("auth.view_group",)), GROUPS + ":1") is True


def test_model_topic_names():
    """model_topic() names the model's topic and an object's."""
    group = Group(pk=5, name="x")
    assert realtime.model_topic(Group) == GROUPS
    assert realtime.model_topic(group) == GROUPS + ":5"
    assert realtime.model_topic(Group, "5") == GROUPS + ":5"


def test_track_refuses_what_is_not_a_model():
    """track() says what it needs instead of failing later."""
    with pytest.raises(TypeError, match="needs a concrete Django model class"):
        realtime.track("auth.Group")  # type: ignore[arg-type]


def test_changes_reach_permitted_subscribers_only(worker):
    """Admin add, change and delete reach viewers of the model's and the object's topics; others learn nothing."""
    root = make_user("root", staff=True, superuser=True)
    # Not staff: a site's own pages (staff would also get the admin's admin.logentry events).
    viewer = make_user("viewer", perms=("auth.view_group",))
    changer = make_user("changer", perms=("auth.change_group",))
    outsider = make_user("outsider", staff=True, perms=("auth.view_user",))
    group = Group.objects.create(name="Night shift")
    object_topic = f"{GROUPS}:{group.pk}"

    ws_viewer, _ = open_ws(worker, get_token(logged_in(viewer)), topics=[GROUPS])
    assert receive(ws_viewer) == {"type": "subscribed", "topic": GROUPS}
    ws_changer, _ = open_ws(worker, get_token(logged_in(changer)))
    assert subscribe(ws_changer, object_topic) == {"type": "subscribed", "topic": object_topic}
    ws_outsider, _ = open_ws(worker, get_token(logged_in(outsider)), topics=[GROUPS, object_topic])
    assert receive(ws_outsider) == {"type": "unsubscribed", "topic": GROUPS}
    assert receive(ws_outsider) == {"type": "unsubscribed", "topic": object_topic}
    refusal = subscribe(ws_outsider, object_topic)
    assert refusal["type"] == "error" and refusal["code"] == "forbidden"

    admin = logged_in(root)
    response = admin.post(f"/admin/auth/group/{group.pk}/change/", {"name": "Day shift"})
    assert response.status_code == 302, response.content[:500]
    assert admin.post(f"/admin/auth/group/{group.pk}/delete/", {"post": "yes"}).status_code == 302

    seen = [(e["topic"], e["data"]["action"], e["data"]["repr"]) for e in receive_events(ws_viewer, 2)]
    assert seen == [(GROUPS, "changed", "Day shift"), (GROUPS, "deleted", "Day shift")]
    (changed, deleted) = receive_events(ws_changer, 2)
    assert changed["event"] == "model.change" and changed["topic"] == object_topic
    data = changed["data"]
    assert data["actor"] == {"id": root.pk, "username": "root"}
    assert set(data) == {"action", "model", "pk", "repr", "actor", "at"}  # no field values
    assert (data["model"], data["pk"]) == ("auth.group", str(group.pk))
    assert deleted["data"]["action"] == "deleted"
    assert_nothing_more(ws_outsider, outsider)
    assert_nothing_more(ws_viewer, viewer)
    for ws in (ws_viewer, ws_changer, ws_outsider):
        ws.close()


def test_losing_the_permission_drops_the_model_topic(worker):
    """A subscriber whose view permission is revoked loses the topic and learns of no later change."""
    viewer = make_user("viewer", perms=("auth.view_group",))
    ws, _ = open_ws(worker, get_token(logged_in(viewer)), topics=[GROUPS])
    assert receive(ws) == {"type": "subscribed", "topic": GROUPS}
    viewer.user_permissions.clear()
    realtime.track(Group)
    try:
        Group.objects.create(name="after")
    finally:
        changes.untrack(Group)
    assert receive(ws) == {"type": "unsubscribed", "topic": GROUPS}
    assert_nothing_more(ws, viewer)
    ws.close()


def test_track_publishes_in_the_transaction_of_the_change(worker):
    """track(): a rollback publishes nothing; a commit publishes created/changed/deleted with the actor."""
    realtime.track(Permission)
    try:
        watcher = make_user("watcher", perms=("auth.view_permission",))
        author = make_user("author")
        ws, _ = open_ws(worker, get_token(logged_in(watcher)), topics=["model:auth.permission"])
        assert receive(ws)["type"] == "subscribed"
        content_type = Permission.objects.first().content_type
        with pytest.raises(RuntimeError), transaction.atomic():
            Permission.objects.create(codename="rolled_back", name="Rolled back", content_type=content_type)
            raise RuntimeError("rollback")
        with transaction.atomic(), realtime.acting_as(author):
            perm = Permission.objects.create(codename="kept", name="Kept", content_type=content_type)
        perm.name = "Kept (renamed)"
        perm.save()  # no actor: unknown
        perm.delete()
        events = receive_events(ws, 3)
        assert [e["data"]["action"] for e in events] == ["created", "changed", "deleted"]
        assert events[0]["data"]["actor"] == {"id": author.pk, "username": "author"}
        assert events[1]["data"]["actor"] is None
        assert events[1]["data"]["repr"].endswith("Kept (renamed)")
        assert_nothing_more(ws, watcher)
        ws.close()
    finally:
        changes.untrack(Permission)


def test_setting_and_model_admin_attribute_turn_it_off():
    """MODEL_CHANGES=False publishes nothing; nor does a ModelAdmin with realtime_changes = False."""
    admin = logged_in(make_user("root", staff=True, superuser=True))
    with override_settings(REALTIME={"MODEL_CHANGES": False}):
        assert admin.post("/admin/auth/group/add/", {"name": "quiet"}).status_code == 302
    assert not Event.objects.filter(name="model.change").exists()
    model_admin = admin_site._registry[Group]
    model_admin.realtime_changes = False  # type: ignore[attr-defined]
    try:
        assert admin.post("/admin/auth/group/add/", {"name": "quiet too"}).status_code == 302
        assert not Event.objects.filter(name="model.change").exists()
    finally:
        del model_admin.realtime_changes  # type: ignore[attr-defined]
    assert admin.post("/admin/auth/group/add/", {"name": "loud"}).status_code == 302
    topics_written = sorted(Event.objects.filter(name="model.change").values_list("topic", flat=True))
    assert topics_written == [GROUPS, f"{GROUPS}:{Group.objects.get(name='loud').pk}"]


def test_changes_outside_the_admin_publish_only_for_tracked_models():
    """The admin publishes its own changes; code elsewhere publishes only for models passed to track()."""
    Group.objects.create(name="by a script")
    make_user("alice")
    assert not Event.objects.filter(name="model.change").exists()
    realtime.track(Group)
    try:
        Group.objects.create(name="tracked")
    finally:
        changes.untrack(Group)
    assert Event.objects.filter(name="model.change").count() == 2


def test_logins_publish_no_user_change():
    """Every login saves last_login: that is not an edit, and publishes nothing even for a tracked user model."""
    from django.contrib.auth import get_user_model

    alice = make_user("alice")
    realtime.track(get_user_model())
    try:
        client = logged_in(alice)
        client.login(username="alice", password="pw-alice")
        assert not Event.objects.filter(name="model.change").exists()
    finally:
        changes.untrack(get_user_model())


def test_worker_refuses_model_topics_under_a_topic_policy(transactional_db):
    """With TOPIC_POLICY set (here one that allows everything), model topics still need the permission."""
    worker = start_worker(realtime={"TOPIC_POLICY": "tests.topic_policies.slow"})
    try:
        outsider = make_user("outsider")
        viewer = make_user("viewer", perms=("auth.view_group",))
        ws, _ = open_ws(worker, get_token(logged_in(outsider)), topics=[GROUPS, "room:1"])
        answers = [receive(ws, timeout=20), receive(ws, timeout=20)]
        assert answers == [
            {"type": "unsubscribed", "topic": GROUPS},
            {"type": "subscribed", "topic": "room:1"},
        ]
        ws2, _ = open_ws(worker, get_token(logged_in(viewer)), topics=[GROUPS])
        assert receive(ws2, timeout=20) == {"type": "subscribed", "topic": GROUPS}
        ws.close()
        ws2.close()
    finally:
        worker.stop()


# The stale-save check of the admin's change form.


def change_form(client, group: Group) -> str:
    response = client.get(f"/admin/auth/group/{group.pk}/change/")
    assert response.status_code == 200
    (seen,) = re.findall(r'name="_realtime_seen" value="(\d+)"', response.content.decode())
    return seen


def test_stale_save_is_refused_unless_confirmed():
    """Someone saved after my page loaded: my save is refused with who and when, until I tick Save anyway."""
    me = logged_in(make_user("me", staff=True, superuser=True))
    other = logged_in(make_user("editor", staff=True, superuser=True))
    group = Group.objects.create(name="Original")
    seen = change_form(me, group)
    assert other.post(f"/admin/auth/group/{group.pk}/change/", {"name": "Theirs"}).status_code == 302

    url = f"/admin/auth/group/{group.pk}/change/"
    response = me.post(url, {"name": "Mine", "_realtime_seen": seen})
    assert response.status_code == 200
    text = response.content.decode()
    assert re.search(
        r"editor changed this group at \d\d:\d\d, after you opened this page: saving would overwrite that change\. "
        r"Reload the page to see it, or tick “Save anyway” and save again\.",
        text,
    )
    assert 'name="_realtime_overwrite"' in text
    assert f'name="_realtime_seen" value="{seen}"' in text  # still refused on a plain retry
    group.refresh_from_db()
    assert group.name == "Theirs"

    response = me.post(url, {"name": "Mine", "_realtime_seen": seen, "_realtime_overwrite": "yes"})
    assert response.status_code == 302
    group.refresh_from_db()
    assert group.name == "Mine"


def test_fresh_save_passes_and_bad_marker_is_a_form_error():
    """No change since the page loaded: the save goes through; a mangled marker is a clear form error."""
    me = logged_in(make_user("me", staff=True, superuser=True))
    group = Group.objects.create(name="Original")
    url = f"/admin/auth/group/{group.pk}/change/"
    seen = change_form(me, group)
    assert me.post(url, {"name": "Mine", "_realtime_seen": seen}).status_code == 302
    for bad in ("x", "-1", "9" * 30, "١٢"):
        response = me.post(url, {"name": "Again", "_realtime_seen": bad})
        assert response.status_code == 200
        assert "This form came with a broken version marker" in response.content.decode()
    # Without the marker (an API client, a template of its own): no check.
    assert me.post(url, {"name": "Again"}).status_code == 302


def test_stale_save_refused_after_a_change_outside_the_admin():
    """For a model passed to track(), a change made by code also makes the open form stale."""
    me = logged_in(make_user("me", staff=True, superuser=True))
    group = Group.objects.create(name="Original")
    seen = change_form(me, group)
    realtime.track(Group)
    try:
        group.name = "By a script"
        group.save()
    finally:
        changes.untrack(Group)
    response = me.post(f"/admin/auth/group/{group.pk}/change/", {"name": "Mine", "_realtime_seen": seen})
    assert response.status_code == 200
    assert "Someone changed this group at" in response.content.decode()


def test_opted_out_model_admin_has_no_marker_and_no_check():
    """realtime_changes = False: the change form has no marker and saves as Django's would."""
    me = logged_in(make_user("me", staff=True, superuser=True))
    group = Group.objects.create(name="Original")
    model_admin = admin_site._registry[Group]
    model_admin.realtime_changes = False  # type: ignore[attr-defined]
    try:
        response = me.get(f"/admin/auth/group/{group.pk}/change/")
        assert "_realtime_seen" not in response.content.decode()
        assert "realtime-admin-page" not in response.content.decode()
        response = me.post(f"/admin/auth/group/{group.pk}/change/", {"name": "Mine", "_realtime_seen": "0"})
        assert response.status_code == 302
    finally:
        del model_admin.realtime_changes  # type: ignore[attr-defined]


@pytest.mark.django_db
def test_a_stale_save_check_reads_one_objects_changes_not_every_event_since_the_page_opened():
    """changed_since() uses the (topic, position) index of model.change events: with 20,000 other
    events after the page's position, the plan is an index scan of that index, not of the outbox."""
    from django.db import connection

    group = Group.objects.create(name="indexed")
    seen = changes.newest_position()
    realtime.publish_many([{"event": "noise", "data": {"i": i}, "topic": "noise"} for i in range(20_000)])
    with connection.cursor() as cursor:
        cursor.execute("UPDATE realtime_event SET position = id WHERE position IS NULL")  # as a commit would
        cursor.execute("ANALYZE realtime_event")
    queryset = Event.objects.filter(name=changes.MODEL_EVENT, topic=changes.model_topic(group), position__gt=seen)
    plan = queryset.order_by("-position").values_list("position", "data")[:1].explain()
    assert "realtime_event_change_idx" in plan, plan
