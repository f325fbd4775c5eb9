"""Admin changes become live ``admin.logentry`` events for exactly the permitted staff."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group

from tests.helpers import assert_nothing_more, get_token, logged_in, make_user, open_ws, receive_events

pytestmark = pytest.mark.django_db(transaction=True)


def test_admin_change_reaches_permitted_staff_only(worker):
    """An admin addition reaches staff who may view the model and superusers, not others."""
    root = make_user("root", staff=True, superuser=True)
    viewer = make_user("viewer", staff=True, perms=("auth.view_group",))
    changer = make_user("changer", staff=True, perms=("auth.change_group",))
    unpermitted = make_user("unpermitted", staff=True, perms=("auth.view_user",))
    outsider = make_user("outsider", perms=("auth.view_group",))  # has the permission, not staff
    users = {u.username: u for u in (viewer, changer, unpermitted, outsider)}
    sockets = {name: open_ws(worker, get_token(logged_in(u)))[0] for name, u in users.items()}

    admin = logged_in(root)
    response = admin.post("/admin/auth/group/add/", {"name": "Editors"})
    assert response.status_code == 302, response.content[:500]
    group = Group.objects.get(name="Editors")

    for name in ("viewer", "changer"):
        (event,) = receive_events(sockets[name], 1)
        assert event["event"] == "admin.logentry"
        data = event["data"]
        assert data["action"] == "addition"
        assert data["object_repr"] == "Editors"
        assert data["content_type"] == "auth.group"
        assert data["object_id"] == str(group.pk)
        assert data["actor"] == {"id": root.pk, "username": "root"}
        assert data["admin_url"] == f"/admin/auth/group/{group.pk}/change/"
        assert data["change_message"] == "Added."
    for name in ("unpermitted", "outsider"):
        assert_nothing_more(sockets[name], users[name])
    for ws in sockets.values():
        ws.close()


def test_admin_bulk_delete_sends_one_event_per_object(worker):
    """The admin's bulk delete action (bulk-created log entries, no post_save) is delivered too."""
    root = make_user("root", staff=True, superuser=True)
    watcher = make_user("watcher", staff=True, superuser=True)
    groups = [Group.objects.create(name=f"g{n}") for n in range(3)]
    ws, _ = open_ws(worker, get_token(logged_in(watcher)))
    response = logged_in(root).post(
        "/admin/auth/group/",
        {"action": "delete_selected", "_selected_action": [g.pk for g in groups], "post": "yes"},
    )
    assert response.status_code == 302
    assert not Group.objects.exists()
    events = receive_events(ws, 3)
    assert sorted(e["data"]["object_repr"] for e in events) == ["g0", "g1", "g2"]
    assert {e["data"]["action"] for e in events} == {"deletion"}
    assert all(e["data"]["admin_url"] is None for e in events)
    assert_nothing_more(ws, watcher)
    ws.close()


def test_inactive_staff_is_not_connected(worker):
    """A deactivated user's open connection is closed with 4401 and gets nothing more."""
    from websockets.exceptions import ConnectionClosed

    root = make_user("root", staff=True, superuser=True)
    other = make_user("other", staff=True, superuser=True)
    ws, _ = open_ws(worker, get_token(logged_in(other)))
    other.is_active = False
    other.save()
    with pytest.raises(ConnectionClosed) as info:
        while True:
            ws.recv(10)
    assert info.value.rcvd.code == 4401
    assert root.is_active
