"""Presence across worker processes: who is online, and presence.join / presence.leave events."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from django.db import connection, connections

from realtime.core.audience import Identity
from realtime.models import PresenceConnection, PresenceSubscription, PresenceWorker
from realtime.presence import online_users
from realtime.worker.presence import PresenceTracker, _ip_of, expire_workers
from realtime.worker.registry import Client
from tests.helpers import (
    WAIT,
    WorkerProcess,
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

# A heartbeat every 0.3 s: a killed worker's rows expire after 3 * 0.3 + 2 = 2.9 s.
FAST = {"PRESENCE_INTERVAL": 0.3, "PRESENCE_TOPICS": ["room:*"]}


@contextmanager
def workers(count: int, realtime: dict[str, Any] | None = None) -> Iterator[list[WorkerProcess]]:
    """``count`` worker processes on their own ports, against the test database."""
    started: list[WorkerProcess] = []
    try:
        for _ in range(count):
            started.append(start_worker(realtime=realtime or FAST))
        yield started
    finally:
        for process in started:
            process.stop()
            process.log_path.unlink(missing_ok=True)


def eventually(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    """Wait until ``condition()`` is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout} s")
        time.sleep(0.05)


def subscriptions(user: Any, topic: str) -> int:
    """How many of ``user``'s connections, on any worker, the database holds as subscribed to ``topic``."""
    return PresenceSubscription.objects.filter(user_id=user.pk, topic=topic).count()


def next_round(process: WorkerProcess) -> None:
    """Wait until a whole presence round of ``process`` has run after this call, and committed.

    Rounds run one after another, each starting with a transaction that sets
    ``heartbeat_at`` to its start time. The first heartbeat later than now
    starts a round after this call; the next heartbeat shows that this round
    is over, its expiry of dead workers included.
    """
    with connection.cursor() as cursor:
        cursor.execute("SELECT now()")
        (now,) = cursor.fetchone()
    rounds = PresenceWorker.objects.filter(pid=process.process.pid)
    eventually(lambda: rounds.filter(heartbeat_at__gt=now).exists())
    started = rounds.get().heartbeat_at
    eventually(lambda: rounds.filter(heartbeat_at__gt=started).exists())


def online(topic: str | None = None) -> set[str]:
    return set(online_users(topic).values_list("username", flat=True))


def presence_events(ws: Any, count: int) -> list[tuple[str, str, str]]:
    return [(event["event"], event["data"]["user"]["username"], event["topic"]) for event in receive_events(ws, count)]


def test_users_on_two_workers_are_online_until_they_disconnect():
    """Users connected to either of two workers are online (per topic too); a disconnected one is not."""
    alice, bob = make_user("alice"), make_user("bob")
    with workers(2) as (first, second):
        alice_ws, _ = open_ws(first, get_token(logged_in(alice)), topics=["room:1"])
        bob_ws, _ = open_ws(second, get_token(logged_in(bob)), topics=["lobby"])
        eventually(lambda: online() == {"alice", "bob"})
        assert online("room:1") == {"alice"}
        assert online("lobby") == {"bob"}
        assert online("nowhere") == set()
        connection = PresenceConnection.objects.get(username="alice")
        assert connection.client_ip == "127.0.0.1"
        assert connection.worker.pid == first.process.pid
        assert PresenceWorker.objects.count() == 2

        alice_ws.close()
        eventually(lambda: online() == {"bob"})
        assert online("room:1") == set()
        bob_ws.close()
        eventually(lambda: online() == set())


def test_killed_workers_users_expire_and_clean_shutdown_removes_the_worker():
    """A SIGKILLed worker's users go offline once its lease runs out; a stopped worker deletes its row."""
    alice, bob = make_user("alice"), make_user("bob")
    with workers(2) as (first, second):
        open_ws(first, get_token(logged_in(alice)))
        bob_ws, _ = open_ws(second, get_token(logged_in(bob)))
        eventually(lambda: online() == {"alice", "bob"})

        first.stop(signal.SIGKILL)
        eventually(lambda: online() == {"bob"})
        # The survivor deletes the dead worker's rows.
        eventually(lambda: list(PresenceWorker.objects.values_list("pid", flat=True)) == [second.process.pid])
        assert list(PresenceConnection.objects.values_list("username", flat=True)) == ["bob"]

        second.stop()
        assert not PresenceWorker.objects.exists()
        assert not PresenceConnection.objects.exists()
        bob_ws.close()


def test_join_and_leave_are_announced_once_across_workers():
    """A user's first connection to a topic on any worker announces presence.join, their last presence.leave."""
    watcher, alice = make_user("watcher"), make_user("alice")
    with workers(2) as (first, second):
        watcher_ws, _ = open_ws(first, get_token(logged_in(watcher)), topics=["room:1"])
        assert presence_events(watcher_ws, 1) == [("presence.join", "watcher", "room:1")]

        # Two connections at once, one on each worker: exactly one join.
        a1, _ = open_ws(second, get_token(logged_in(alice)), topics=["room:1"])
        a2, _ = open_ws(first, get_token(logged_in(alice)), topics=["room:1"])
        assert presence_events(watcher_ws, 1) == [("presence.join", "alice", "room:1")]
        # A join commits with the row it announces: once both rows are written, a second join would come first.
        eventually(lambda: subscriptions(alice, "room:1") == 2)
        assert_nothing_more(watcher_ws, watcher)

        a1.close()  # alice is still in room:1 through a2
        eventually(lambda: subscriptions(alice, "room:1") == 1)
        assert_nothing_more(watcher_ws, watcher)
        a2.close()
        assert presence_events(watcher_ws, 1) == [("presence.leave", "alice", "room:1")]
        for process in (first, second):  # a later round announces nothing more
            next_round(process)
        assert_nothing_more(watcher_ws, watcher)

        # Subscribing and unsubscribing count as joining and leaving.
        a3, _ = open_ws(second, get_token(logged_in(alice)))
        a3.send('{"type": "subscribe", "topic": "room:1"}')
        assert presence_events(watcher_ws, 1) == [("presence.join", "alice", "room:1")]
        a3.send('{"type": "unsubscribe", "topic": "room:1"}')
        assert presence_events(watcher_ws, 1) == [("presence.leave", "alice", "room:1")]
        a3.close()
        watcher_ws.close()


def test_topics_not_opted_in_have_no_presence_events():
    """Subscribers of a topic outside PRESENCE_TOPICS receive no presence events."""
    watcher, alice = make_user("watcher"), make_user("alice")
    with workers(1) as (worker,):
        watcher_ws, _ = open_ws(worker, get_token(logged_in(watcher)), topics=["lobby"])
        assert receive(watcher_ws) == {"type": "subscribed", "topic": "lobby"}
        alice_ws, _ = open_ws(worker, get_token(logged_in(alice)), topics=["lobby"])
        # A join would commit with alice's row, so before the sentinel.
        eventually(lambda: online("lobby") == {"watcher", "alice"})
        assert_nothing_more(watcher_ws, watcher)
        alice_ws.close()
        watcher_ws.close()


def test_dead_worker_announces_leave_through_the_survivor():
    """When a killed worker's lease runs out, a surviving worker announces its users' presence.leave."""
    watcher, alice = make_user("watcher"), make_user("alice")
    with workers(2) as (first, second):
        watcher_ws, _ = open_ws(first, get_token(logged_in(watcher)), topics=["room:1"])
        assert presence_events(watcher_ws, 1) == [("presence.join", "watcher", "room:1")]
        open_ws(second, get_token(logged_in(alice)), topics=["room:1"])
        assert presence_events(watcher_ws, 1) == [("presence.join", "alice", "room:1")]

        second.stop(signal.SIGKILL)
        assert presence_events(watcher_ws, 1) == [("presence.leave", "alice", "room:1")]
        next_round(first)  # the survivor's next expiry announces nothing more
        assert_nothing_more(watcher_ws, watcher)
        watcher_ws.close()


def test_tracker_rewrites_rows_expired_behind_its_back():
    """A live worker whose rows another worker expired writes them again at its next round."""
    user = make_user("alice")
    client = Client(None, Identity(user.pk, "alice", "h", False, False, frozenset(), frozenset()), "127.0.0.1")
    client.topics = frozenset({"lobby"})
    tracker = PresenceTracker()

    async def scenario() -> None:
        # One thread, whose database connection is closed at the end (CONN_MAX_AGE keeps it otherwise).
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(1))

        def online_in_lobby() -> list[Any]:
            return list(online_users("lobby"))

        tracker.joined(client)
        await tracker.flush()
        assert await asyncio.to_thread(online_in_lobby) == [user]
        # As a worker that believed this one dead would do:
        assert await asyncio.to_thread(expire_workers, [tracker.worker_id]) == 1
        assert await asyncio.to_thread(online_in_lobby) == []
        await tracker.flush()
        assert await asyncio.to_thread(online_in_lobby) == [user]
        tracker.left(client)
        await tracker.close()
        await asyncio.to_thread(connections.close_all)

    asyncio.run(scenario())
    assert not PresenceWorker.objects.exists()
    assert not PresenceConnection.objects.exists()


def test_simultaneous_first_subscriptions_on_two_workers_announce_once():
    """Two workers writing the same user's first subscription at the same moment publish one presence.join."""
    from realtime.models import Event
    from realtime.worker.presence import _Connection, _WorkerRow, _write

    users = [make_user(f"user{n}") for n in range(15)]
    worker_rows = [_WorkerRow(f"worker-{n}", "host", n, datetime.now(UTC)) for n in (1, 2)]

    def add(row: _WorkerRow, user: Any, start: threading.Barrier) -> None:
        topics = frozenset({"room:1"})
        entry = _Connection(f"{row.id}.{user.pk}", user.pk, user.username, "127.0.0.1", time.time(), topics)
        start.wait()
        try:
            _write(row, {entry.id: entry}, {}, lease=60.0, patterns=("room:*",))
        finally:
            connections.close_all()

    with ThreadPoolExecutor(2) as pool:
        for user in users:
            start = threading.Barrier(2)
            for future in [pool.submit(add, row, user, start) for row in worker_rows]:
                future.result()
    joins = Counter(event.data["user"]["username"] for event in Event.objects.filter(name="presence.join"))
    assert joins == {user.username: 1 for user in users}


@pytest.mark.parametrize(
    ("remote", "ip"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("10.0.0.2:5678", "10.0.0.2"),
        ("[::1]:8765", "::1"),
        ("::1", "::1"),
        ("unix", "unix"),
    ],
)
def test_client_ip_is_extracted_from_the_remote_address(remote, ip):
    """The stored client IP has no port, whichever form the worker logged."""
    assert _ip_of(remote) == ip


def test_a_nul_topic_is_refused_and_presence_keeps_working(transactional_db):
    """Subscribing to a topic with a NUL is refused; everyone else's presence is still written."""
    with workers(1) as (worker,):
        mallory, alice = make_user("mallory"), make_user("alice")
        attacker, _ = open_ws(worker, get_token(logged_in(mallory)))
        attacker.send('{"type": "subscribe", "topic": "room:x\\u0000y"}')
        assert receive(attacker)["code"] == "bad_topic"
        ws, _ = open_ws(worker, get_token(logged_in(alice)), topics=["room:lobby"])
        eventually(lambda: set(online_users("room:lobby").values_list("username", flat=True)) == {"alice"})
        eventually(lambda: set(online_users().values_list("username", flat=True)) == {"alice", "mallory"})
        assert "Traceback" not in worker.log()
        attacker.close()
        ws.close()
