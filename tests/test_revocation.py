"""No event committed after a revocation reaches the revoked connection.

Each test ends with a sentinel event: delivery is in commit order, so "the
sentinel arrived and nothing unwanted before it" is a deterministic check.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from django.contrib.auth.models import Group
from django.contrib.sessions.models import Session
from django.db import transaction
from websockets.exceptions import ConnectionClosed

from realtime import publish
from realtime.models import Event
from tests.helpers import WAIT, get_token, logged_in, make_user, open_ws, start_worker

pytestmark = pytest.mark.django_db(transaction=True)


def events_until(ws, name: str, timeout: float = WAIT) -> list[dict]:
    """Return the events received up to and including the first one called ``name``."""
    received = []
    deadline = time.monotonic() + timeout
    while True:
        message = json.loads(ws.recv(max(0.01, deadline - time.monotonic())))
        if message["type"] == "event":
            received.append(message)
            if message["event"] == name:
                return received


def messages_until_closed(ws) -> tuple[list[dict], int | None]:
    """Return every message received until the server closes ``ws``, and its close code."""
    received = []
    try:
        while True:
            received.append(json.loads(ws.recv(WAIT)))
    except ConnectionClosed as exc:
        return received, exc.rcvd.code if exc.rcvd else None


def test_group_removed_in_the_same_transaction_as_the_event(worker):
    """Removing a user from a group and publishing to that group in one transaction: the user never gets it."""
    alice = make_user("alice")
    team = Group.objects.create(name="team")
    alice.groups.add(team)
    ws, _ = open_ws(worker, get_token(logged_in(alice)))
    publish("while-member", {}, groups=["team"])
    assert events_until(ws, "while-member")[-1]["event"] == "while-member"
    with transaction.atomic():
        alice.groups.remove(team)
        publish("after-removal", {}, groups=["team"])
    publish("sentinel", {}, users=[alice])
    assert [e["event"] for e in events_until(ws, "sentinel")] == ["sentinel"]
    ws.close()


def test_deactivated_in_the_same_transaction_as_the_event(worker):
    """Deactivating a user and publishing to them in one transaction: the socket closes 4401 without the event."""
    alice = make_user("alice")
    ws, _ = open_ws(worker, get_token(logged_in(alice)))
    with transaction.atomic():
        alice.is_active = False
        alice.save()
        publish("after-deactivation", {}, users=[alice])
    received, code = messages_until_closed(ws)
    assert code == 4401
    assert [m for m in received if m["type"] == "event"] == []


def test_session_deleted_in_the_same_transaction_as_the_event(worker):
    """Deleting the session and publishing to its user in one transaction: the socket closes 4401 without it."""
    alice = make_user("alice")
    web = logged_in(alice)
    ws, _ = open_ws(worker, get_token(web))
    with transaction.atomic():
        Session.objects.filter(pk=web.session.session_key).delete()
        publish("after-logout", {}, users=[alice])
    received, code = messages_until_closed(ws)
    assert code == 4401
    assert [m for m in received if m["type"] == "event"] == []


def test_nothing_committed_after_removal_arrives_under_a_stream_of_events(worker):
    """With events to a group streaming, none committed after a member's removal reaches that member."""
    team = Group.objects.create(name="team")
    members = [make_user(f"member{n}") for n in range(4)]
    sockets = {}
    for member in members:
        member.groups.add(team)
        sockets[member.pk], _ = open_ws(worker, get_token(logged_in(member)))
    stop = threading.Event()

    def stream() -> None:
        n = 0
        while not stop.is_set():
            publish("stream", {"n": n}, groups=["team"])
            n += 1

    publishers = [threading.Thread(target=stream) for _ in range(3)]
    for publisher in publishers:
        publisher.start()
    try:
        for member in members:  # one removal at a time, mid-stream
            time.sleep(0.3)
            member.groups.remove(team)
        time.sleep(0.3)
    finally:
        stop.set()
        for publisher in publishers:
            publisher.join()
    revoked_at = {
        event.data["users"][0]: event.position
        for event in Event.objects.filter(control=True, name="realtime.user_changed").order_by("position")
    }
    for member in members:
        publish("sentinel", {}, users=[member])
        received = events_until(sockets[member.pk], "sentinel", timeout=30)
        streamed = [e["id"] for e in received if e["event"] == "stream"]
        assert streamed, "some events arrived before the removal"
        assert max(streamed) < revoked_at[member.pk], member.username
        assert Event.objects.filter(name="stream", position__gt=revoked_at[member.pk]).exists()
        sockets[member.pk].close()


def test_rights_gained_apply_to_events_committed_while_they_are_read(worker):
    """Joining a group and publishing to it in one transaction: the new member receives it."""
    alice = make_user("alice")
    team = Group.objects.create(name="team")
    ws, _ = open_ws(worker, get_token(logged_in(alice)))
    with transaction.atomic():
        alice.groups.add(team)
        publish("welcome-aboard", {}, groups=["team"])
    publish("sentinel", {}, users=[alice])
    assert [e["event"] for e in events_until(ws, "sentinel")] == ["welcome-aboard", "sentinel"]
    ws.close()


def test_logout_during_a_login_closes_the_new_socket(transactional_db):
    """A logout committed while a login is being checked closes that socket 4401 before any event reaches it."""
    worker = start_worker(realtime={"TOPIC_POLICY": "tests.topic_policies.slow"})
    try:
        alice = make_user("alice")
        web = logged_in(alice)
        token = get_token(web)
        result: dict = {}

        def login() -> None:
            from websockets.sync.client import connect

            from tests.helpers import ORIGIN

            with connect(worker.url, origin=ORIGIN, open_timeout=WAIT) as ws:
                ws.send(json.dumps({"type": "auth", "token": token, "last_id": None, "topics": ["slow"]}))
                result["messages"], result["code"] = messages_until_closed(ws)

        thread = threading.Thread(target=login)
        thread.start()
        time.sleep(0.5)  # the slow topic policy holds the login between its check and its registration
        web.logout()
        publish("after-logout", {}, users=[alice])
        thread.join(30)
        assert result["code"] == 4401
        assert [m for m in result["messages"] if m["type"] == "event"] == []
        assert "closed 4401" in worker.log() or "closing 4401" in worker.log()
    finally:
        worker.stop()


def test_a_replay_during_a_rights_change_uses_the_new_rights(transactional_db):
    """Removed from a group while logging in with last_id: the replay leaves out that group's later event."""
    worker = start_worker(realtime={"TOPIC_POLICY": "tests.topic_policies.slow"})
    try:
        alice = make_user("alice")
        team = Group.objects.create(name="team")
        alice.groups.add(team)
        web = logged_in(alice)
        first, welcome = open_ws(worker, get_token(web))
        first.close()
        token = get_token(web)
        result: dict = {}

        def login() -> None:
            from websockets.sync.client import connect

            from tests.helpers import ORIGIN

            with connect(worker.url, origin=ORIGIN, open_timeout=WAIT) as ws:
                auth = {"type": "auth", "token": token, "last_id": welcome["last_id"], "topics": ["slow"]}
                ws.send(json.dumps(auth))
                result["events"] = [e["event"] for e in events_until(ws, "sentinel", timeout=30)]

        thread = threading.Thread(target=login)
        thread.start()
        time.sleep(0.4)  # the slow topic policy holds the login between its check and its registration
        alice.groups.remove(team)
        publish("after-removal", {}, groups=["team"])
        time.sleep(1.5)  # registered, replaying
        publish("sentinel", {}, users=[alice])
        thread.join(30)
        assert result["events"] == ["sentinel"]
    finally:
        worker.stop()


def test_a_subscription_decided_across_a_revocation_is_decided_again(transactional_db):
    """A permission revoked while the topic policy decides a subscription: the answer is a refusal."""
    from django.contrib.auth.models import Permission

    from tests.helpers import receive

    worker = start_worker(realtime={"TOPIC_POLICY": "tests.topic_policies.slow_permission"})
    try:
        alice = make_user("alice", perms=("auth.view_user",))
        ws, _ = open_ws(worker, get_token(logged_in(alice)))
        ws.send(json.dumps({"type": "subscribe", "topic": "t"}))
        time.sleep(0.5)  # the policy has read alice's permissions and is still deciding
        alice.user_permissions.remove(Permission.objects.get(codename="view_user", content_type__app_label="auth"))
        answer = receive(ws, timeout=30)
        assert answer["type"] == "error" and answer["code"] == "forbidden", answer
        publish("on-topic", {}, topic="t")
        publish("sentinel", {}, users=[alice])
        assert [e["event"] for e in events_until(ws, "sentinel")] == ["sentinel"]
        ws.close()
    finally:
        worker.stop()
