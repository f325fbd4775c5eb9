"""Admin tools: the "Online now" page, the "Send a notification" action and ``manage.py realtime_send``."""

from __future__ import annotations

import time

import pytest
from django.contrib.auth.models import Group
from django.core.management import CommandError, call_command

from realtime.models import Event
from tests.helpers import (
    WAIT,
    assert_nothing_more,
    get_token,
    logged_in,
    make_user,
    open_ws,
    receive_events,
    start_worker,
)

pytestmark = pytest.mark.django_db(transaction=True)

ONLINE_NOW = "/admin/realtime/presenceconnection/"
USERS = "/admin/auth/user/"


@pytest.fixture
def fast_worker(transactional_db):
    """A worker that writes presence every 0.3 s."""
    process = start_worker(realtime={"PRESENCE_INTERVAL": 0.3})
    try:
        yield process
    finally:
        process.stop()
        process.log_path.unlink(missing_ok=True)


def test_online_now_lists_connected_users_to_permitted_staff(fast_worker):
    """Superusers and staff with realtime.view_presence see who is connected; other staff get 403."""
    root = make_user("root", staff=True, superuser=True)
    viewer = make_user("viewer", staff=True, perms=("realtime.view_presence",))
    other = make_user("other", staff=True, perms=("auth.view_user",))
    alice = make_user("alice")
    ws, _ = open_ws(fast_worker, get_token(logged_in(alice)), topics=["room:1"])
    admin = logged_in(root)

    deadline = time.monotonic() + WAIT
    while True:
        response = admin.get(ONLINE_NOW)
        assert response.status_code == 200
        if "alice" in response.text:
            break
        assert time.monotonic() < deadline, "alice never appeared"
        time.sleep(0.1)
    assert "room:1" in response.text
    assert "127.0.0.1" in response.text
    assert f"(pid {fast_worker.process.pid})" in response.text
    assert "Online now" in admin.get("/admin/").text

    assert "alice" in logged_in(viewer).get(ONLINE_NOW).text
    assert logged_in(other).get(ONLINE_NOW).status_code == 403
    assert "Online now" not in logged_in(other).get("/admin/").text
    assert admin.get(ONLINE_NOW + "add/").status_code == 403
    ws.close()


def test_send_notification_action_reaches_selected_users_only(worker):
    """The action asks for a message, then only the selected users receive the notification."""
    root = make_user("root", staff=True, superuser=True)
    alice, bob = make_user("alice"), make_user("bob")
    alice_ws, _ = open_ws(worker, get_token(logged_in(alice)))
    bob_ws, _ = open_ws(worker, get_token(logged_in(bob)))
    admin = logged_in(root)
    chosen = {"action": "send_notification", "_selected_action": [alice.pk]}

    form = admin.post(USERS, {**chosen, "index": 0})
    assert form.status_code == 200
    assert 'name="message"' in form.text
    assert_nothing_more(alice_ws, alice)

    done = admin.post(USERS, {**chosen, "apply": "yes", "message": "Lunch is ready"}, follow=True)
    assert done.status_code == 200
    assert "Notification sent to 1 user." in done.text
    (event,) = receive_events(alice_ws, 1)
    assert event["event"] == "notification"
    assert event["data"] == {"message": "Lunch is ready", "from": {"id": root.pk, "username": "root"}}
    assert_nothing_more(bob_ws, bob)
    alice_ws.close()
    bob_ws.close()


def test_send_notification_action_validates_the_message(transactional_db):
    """An empty or too long message shows the form again with an error, and publishes nothing."""
    root = make_user("root", staff=True, superuser=True)
    alice = make_user("alice")
    admin = logged_in(root)
    chosen = {"action": "send_notification", "_selected_action": [alice.pk], "apply": "yes"}

    empty = admin.post(USERS, {**chosen, "message": "  "})
    assert empty.status_code == 200
    assert "This field is required." in empty.text
    too_long = admin.post(USERS, {**chosen, "message": "x" * 1001})
    assert too_long.status_code == 200
    assert "Ensure this value has at most 1000 characters (it has 1001)." in too_long.text
    assert not Event.objects.filter(name="notification").exists()


def test_send_notification_needs_the_change_permission(transactional_db):
    """Staff who may only view users are not offered the action."""
    viewer = make_user("viewer", staff=True, perms=("auth.view_user",))
    response = logged_in(viewer).get(USERS)
    assert response.status_code == 200
    assert "send_notification" not in response.text
    assert "send_notification" in logged_in(make_user("root", staff=True, superuser=True)).get(USERS).text


def test_realtime_send_delivers_a_notification(worker, capsys):
    """realtime_send publishes one committed event that reaches the named user only."""
    alice, bob = make_user("alice"), make_user("bob")
    alice_ws, _ = open_ws(worker, get_token(logged_in(alice)))
    bob_ws, _ = open_ws(worker, get_token(logged_in(bob)))

    call_command("realtime_send", "--user", "alice", "--message", "Deploy at 22:00")
    (event,) = receive_events(alice_ws, 1)
    assert event["event"] == "notification"
    assert event["data"] == {"message": "Deploy at 22:00"}
    assert capsys.readouterr().out == f"Published 'notification' (id {event['id']}).\n"
    assert_nothing_more(bob_ws, bob)

    call_command("realtime_send", "--everyone", "--event", "build.done", "--data", '{"ok": true, "n": 3}')
    for ws in (alice_ws, bob_ws):
        (event,) = receive_events(ws, 1)
        assert (event["event"], event["data"]) == ("build.done", {"ok": True, "n": 3})
    alice_ws.close()
    bob_ws.close()


def test_realtime_send_builds_the_audience(transactional_db):
    """Every audience option ends up in the outbox row."""
    alice, bob = make_user("alice"), make_user("bob")
    Group.objects.create(name="editors")
    call_command(
        "realtime_send",
        "--user=alice",
        "--user=bob",
        "--group=editors",
        "--staff",
        "--permission=auth.view_user",
        "--topic=room:1",
        "--message=hi",
    )
    event = Event.objects.get(name="notification")
    assert sorted(event.users) == sorted([alice.pk, bob.pk])
    assert event.groups == ["editors"]
    assert event.permissions == ["auth.view_user"]
    assert event.staff
    assert not event.everyone
    assert event.topic == "room:1"
    assert event.position is not None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--user=alice"], "Give --message TEXT or --data JSON."),
        (["--user=alice", "--message=hi", "--data={}"], "Give --message or --data, not both."),
        (["--user=alice", "--message= "], "--message is empty."),
        (
            ["--user=alice", "--data={bad"],
            "--data is not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1).",
        ),
        (["--message=hi"], "No audience: give --user, --group, --permission, --staff, --everyone or --topic."),
        (["--user=alice", "--user=nobody", "--user=ghost", "--message=hi"], "Unknown user(s): nobody, ghost."),
        (["--group=nope", "--message=hi"], "Unknown group(s): nope."),
        (
            ["--permission=view_user", "--message=hi"],
            "--permission must look like app_label.codename, not 'view_user'.",
        ),
        (["--permission=auth.fly", "--message=hi"], "Unknown permission 'auth.fly'."),
        (["--everyone", "--event=realtime.x", "--message=hi"], "event names starting with 'realtime.' are reserved."),
        (
            ["--topic=", "--message=hi"],
            "No audience: give --user, --group, --permission, --staff, --everyone or --topic.",
        ),
    ],
)
def test_realtime_send_errors(transactional_db, args, message):
    """Each mistake is a CommandError with a clear message, and nothing is published."""
    make_user("alice")
    with pytest.raises(CommandError) as info:
        call_command("realtime_send", *args)
    assert str(info.value) == message
    assert not Event.objects.exists()
