"""End to end: a real worker process, real PostgreSQL, a real websockets client."""

from __future__ import annotations

import json
import threading

import pytest
from django.db import transaction
from websockets.sync.client import connect

from realtime import publish
from realtime.models import Event
from tests.helpers import (
    ORIGIN,
    WAIT,
    assert_nothing_more,
    closed_code,
    get_token,
    logged_in,
    make_user,
    open_ws,
    receive,
    receive_events,
    start_worker,
)

pytestmark = pytest.mark.django_db(transaction=True)


def test_welcome_then_committed_event_exactly_once(worker):
    """A committed publish reaches its user once, with the contract's fields."""
    alice = make_user("alice")
    ws, welcome = open_ws(worker, get_token(logged_in(alice)))
    assert welcome["user"] == {"id": alice.pk, "username": "alice"}
    with transaction.atomic():
        publish("order.shipped", {"order": 42}, users=[alice])
    (event,) = receive_events(ws, 1)
    assert event["event"] == "order.shipped"
    assert event["data"] == {"order": 42}
    assert event["topic"] is None
    assert event["id"] > welcome["last_id"]
    assert "T" in event["at"]
    assert_nothing_more(ws, alice)
    ws.close()


def test_rolled_back_publish_delivers_nothing(worker):
    """A publish in a rolled-back transaction is never sent."""
    alice = make_user("alice")
    ws, _ = open_ws(worker, get_token(logged_in(alice)))
    with pytest.raises(RuntimeError), transaction.atomic():
        publish("ghost", {}, users=[alice])
        raise RuntimeError("roll back")
    publish("real", {}, users=[alice])
    (event,) = receive_events(ws, 1)
    assert event["event"] == "real"
    assert_nothing_more(ws, alice)
    assert not Event.objects.filter(name="ghost").exists()
    ws.close()


def test_out_of_order_commits_are_delivered_and_resumed(worker):
    """Two transactions committing out of id order: both arrive, and resume from the first seen gets the other."""
    alice = make_user("alice")
    client = logged_in(alice)
    ws, _ = open_ws(worker, get_token(client))
    a_inserted, b_committed = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def transaction_a() -> None:
        try:
            with transaction.atomic():
                publish("A", {}, users=[alice.pk])
                a_inserted.set()
                assert b_committed.wait(WAIT)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            from django.db import connection

            connection.close()

    thread = threading.Thread(target=transaction_a)
    thread.start()
    assert a_inserted.wait(WAIT)
    with transaction.atomic():
        publish("B", {}, users=[alice.pk])
    b_committed.set()
    thread.join(WAIT)
    assert not errors

    a, b = Event.objects.get(name="A"), Event.objects.get(name="B")
    assert a.pk < b.pk, "A inserted first"
    assert b.position < a.position, "B committed first, so it comes first"

    first, second = receive_events(ws, 2)
    assert [first["event"], second["event"]] == ["B", "A"]
    assert first["id"] < second["id"]
    ws.close()

    # A client that saw only B resumes from B's id and still gets A.
    resumed, _ = open_ws(worker, get_token(client), last_id=first["id"])
    (again,) = receive_events(resumed, 1)
    assert again["event"] == "A"
    assert again["id"] == second["id"]
    assert_nothing_more(resumed, alice)
    resumed.close()


def test_resume_delivers_exactly_what_was_missed(worker):
    """A reconnecting client gets the events it missed, once, in order, and then live ones."""
    alice = make_user("alice")
    client = logged_in(alice)
    ws, _ = open_ws(worker, get_token(client))
    publish("e", {"n": 0}, users=[alice])
    (seen,) = receive_events(ws, 1)
    ws.close()
    for n in range(1, 6):
        publish("e", {"n": n}, users=[alice])
    publish("other", {}, everyone=False, users=[make_user("bob")])
    ws, _ = open_ws(worker, get_token(client), last_id=seen["id"])
    missed = receive_events(ws, 5)
    assert [m["data"]["n"] for m in missed] == [1, 2, 3, 4, 5]
    publish("e", {"n": 6}, users=[alice])
    (live,) = receive_events(ws, 1)
    assert live["data"]["n"] == 6
    assert_nothing_more(ws, alice)
    ws.close()


def test_large_payload_arrives_intact(worker):
    """A 100 KB payload is delivered byte for byte."""
    alice = make_user("alice")
    ws, _ = open_ws(worker, get_token(logged_in(alice)))
    blob = "é" + "x" * 100_000
    publish("big", {"blob": blob}, users=[alice])
    (event,) = receive_events(ws, 1)
    assert event["data"]["blob"] == blob
    ws.close()


def test_no_first_message_closes_4408(transactional_db):
    """A client that never authenticates is closed with 4408 after AUTH_TIMEOUT."""
    worker = start_worker({"REALTIME_AUTH_TIMEOUT": "0.5"})
    try:
        with connect(worker.url, origin=ORIGIN) as ws:
            assert closed_code(ws) == 4408
    finally:
        worker.stop()


@pytest.mark.parametrize("first", ["not-a-token", '{"type": "auth", "token": "x:y:z"}'])
def test_bad_token_closes_4401(worker, first):
    """A forged token, bare or in an auth message, closes with 4401."""
    with connect(worker.url, origin=ORIGIN) as ws:
        ws.send(first)
        assert closed_code(ws) == 4401


def test_bare_token_is_accepted(worker):
    """The first message may be the bare token string, as in the websockets docs."""
    alice = make_user("alice")
    with connect(worker.url, origin=ORIGIN) as ws:
        ws.send(get_token(logged_in(alice)))
        assert receive(ws)["type"] == "welcome"


def test_malformed_first_message_closes_1008(worker):
    """A first message that is JSON but not an auth message is a protocol violation."""
    with connect(worker.url, origin=ORIGIN) as ws:
        ws.send(json.dumps({"type": "subscribe", "topic": "x"}))
        assert closed_code(ws) == 1008


def test_audiences_reach_only_their_members(worker):
    """users, groups, permission, staff, everyone and topic each reach exactly their members."""
    from django.contrib.auth.models import Group

    editors = Group.objects.create(name="editors")
    alice = make_user("alice")
    bob = make_user("bob", staff=True)
    carol = make_user("carol", perms=("auth.view_user",))
    root = make_user("root", staff=True, superuser=True)
    alice.groups.add(editors)
    users = {u.username: u for u in (alice, bob, carol, root)}
    sockets = {
        name: open_ws(worker, get_token(logged_in(u)), topics=["news"] if u is carol else None)[0]
        for name, u in users.items()
    }
    receive(sockets["carol"])  # subscribed ack
    publish("to-group", {}, groups=["editors"])
    publish("to-perm", {}, permission="auth.view_user")
    publish("to-staff", {}, staff=True)
    publish("to-topic", {}, topic="news")
    publish("to-all", {}, everyone=True)
    expected = {
        "alice": ["to-group", "to-all"],
        "bob": ["to-staff", "to-all"],
        "carol": ["to-perm", "to-topic", "to-all"],
        "root": ["to-perm", "to-staff", "to-all"],
    }
    for name, events in expected.items():
        got = [e["event"] for e in receive_events(sockets[name], len(events))]
        assert got == events, name
        assert_nothing_more(sockets[name], users[name])
        sockets[name].close()


def test_subscribe_ping_and_errors(worker):
    """subscribe/unsubscribe are acknowledged, ping gets pong, bad messages get an error and keep the connection."""
    alice = make_user("alice")
    ws, _ = open_ws(worker, get_token(logged_in(alice)))
    ws.send(json.dumps({"type": "subscribe", "topic": "room:1"}))
    assert receive(ws) == {"type": "subscribed", "topic": "room:1"}
    publish("said", {"text": "hi"}, topic="room:1")
    (event,) = receive_events(ws, 1)
    assert event["topic"] == "room:1"
    ws.send(json.dumps({"type": "ping"}))
    assert receive(ws) == {"type": "pong"}
    ws.send("{not json")
    assert receive(ws)["code"] == "bad_json"
    ws.send(json.dumps({"type": "dance"}))
    assert receive(ws)["code"] == "unknown_type"
    ws.send(json.dumps({"type": "unsubscribe", "topic": "room:1"}))
    assert receive(ws) == {"type": "unsubscribed", "topic": "room:1"}
    publish("said", {"text": "again"}, topic="room:1")
    assert_nothing_more(ws, alice)
    ws.close()


def test_logout_closes_that_sessions_sockets(worker):
    """Logging out closes the sockets of that session with 4401, and only those."""
    alice = make_user("alice", staff=True)  # the admin's logout view is for staff
    web1, web2 = logged_in(alice), logged_in(alice)
    ws1, _ = open_ws(worker, get_token(web1))
    ws2, _ = open_ws(worker, get_token(web2))
    assert web1.post("/admin/logout/").status_code == 200
    assert closed_code(ws1) == 4401
    publish("still-here", {}, users=[alice])
    assert receive_events(ws2, 1)[0]["event"] == "still-here"
    ws2.close()


def test_health_ready_and_metrics(worker):
    """/healthz and /readyz answer 200 on the websocket port, /metrics counts events."""
    assert worker.http("/healthz") == (200, "OK\n")
    assert worker.http("/readyz")[0] == 200
    alice = make_user("alice")
    ws, _ = open_ws(worker, get_token(logged_in(alice)))
    publish("counted", {}, users=[alice])
    receive_events(ws, 1)
    status, text = worker.http("/metrics")
    assert status == 200
    assert "realtime_connections 1.0" in text
    assert "realtime_events_routed_total 1.0" in text
    assert 'realtime_authentications_total{outcome="accepted"} 1.0' in text
    ws.close()


def test_sigterm_closes_clients_with_1001_and_exits_cleanly(worker):
    """SIGTERM closes every connection with 1001 (going away) and the process exits 0."""
    alice = make_user("alice")
    ws, _ = open_ws(worker, get_token(logged_in(alice)))
    assert worker.stop() == 0
    assert closed_code(ws) == 1001
    assert "Traceback" not in worker.log()


def test_listener_uses_its_own_named_connection(worker):
    """The listener's connection is visible in pg_stat_activity as realtime-listener, LISTENing."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'realtime-listener' AND datname = %s",
            [connection.settings_dict["NAME"]],
        )
        (count,) = cursor.fetchone()
    assert count == 2  # one LISTENs, one reads rows


def test_topic_policy_refuses_with_an_error_not_a_disconnect(transactional_db):
    """TOPICS patterns decide who may subscribe; a refusal is an error message and the connection lives on."""
    worker = start_worker(realtime={"TOPICS": {"staff:*": "auth.view_user", "public:*": None}})
    try:
        alice = make_user("alice")
        ws, _ = open_ws(worker, get_token(logged_in(alice)), topics=["staff:1"])
        assert receive(ws) == {"type": "unsubscribed", "topic": "staff:1"}  # refused at auth
        for topic in ("staff:2", "elsewhere"):
            ws.send(json.dumps({"type": "subscribe", "topic": topic}))
            error = receive(ws)
            assert (error["type"], error["code"], error.get("topic")) == ("error", "forbidden", topic), error
            assert error["message"] == f"You may not subscribe to topic {topic!r}."
        ws.send(json.dumps({"type": "subscribe", "topic": "public:1"}))
        assert receive(ws) == {"type": "subscribed", "topic": "public:1"}
        publish("news", {}, topic="staff:2")
        publish("news", {}, topic="public:1")
        (event,) = receive_events(ws, 1)
        assert event["topic"] == "public:1"
        ws.close()
    finally:
        worker.stop()


def test_publish_many_is_delivered_in_order(worker):
    """A batch published with publish_many() arrives complete and in order."""
    from realtime import publish_many

    alice = make_user("alice")
    ws, _ = open_ws(worker, get_token(logged_in(alice)))
    with transaction.atomic():
        publish_many({"event": "bulk", "data": {"n": n}, "users": [alice.pk]} for n in range(2000))
    events = receive_events(ws, 2000)
    assert [e["data"]["n"] for e in events] == list(range(2000))
    ws.close()


def test_custom_topic_policy_runs_with_the_orm(transactional_db):
    """A TOPIC_POLICY function decides subscriptions with the ORM; one that raises refuses without disconnecting."""
    from django.contrib.auth.models import Group

    alice = make_user("alice")
    alice.groups.add(Group.objects.create(name="blue"))
    worker = start_worker(realtime={"TOPIC_POLICY": "tests.topic_policies.members_only"})
    try:
        ws, _ = open_ws(worker, get_token(logged_in(alice)), topics=["room:blue", "room:red"])
        assert receive(ws) == {"type": "subscribed", "topic": "room:blue"}
        assert receive(ws) == {"type": "unsubscribed", "topic": "room:red"}
        ws.send(json.dumps({"type": "subscribe", "topic": "room:red"}))
        assert receive(ws)["code"] == "forbidden"
        publish("said", {}, topic="room:red")
        publish("said", {}, topic="room:blue")
        (event,) = receive_events(ws, 1)
        assert event["topic"] == "room:blue"
        ws.close()
    finally:
        worker.stop()
    broken = start_worker(realtime={"TOPIC_POLICY": "tests.topic_policies.broken"})
    try:
        ws, _ = open_ws(broken, get_token(logged_in(alice)))
        ws.send(json.dumps({"type": "subscribe", "topic": "room:blue"}))
        assert receive(ws)["code"] == "forbidden"
        ws.send(json.dumps({"type": "ping"}))
        assert receive(ws) == {"type": "pong"}
        ws.close()
    finally:
        broken.stop()
    assert "TOPIC_POLICY tests.topic_policies.broken failed" in broken.log()
