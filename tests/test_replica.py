"""Replica reads (``REALTIME["READ_DATABASE"]``) against a real streaming replica of the test cluster.

The replica is made with ``pg_basebackup -R`` and runs as a hot standby
(tests/replica_support.py). Its replay is paused (``pg_wal_replay_pause()``)
and it is restarted while events are published: the workers read what it
shows, wait for what it does not show yet, and deliver every committed event
once, in commit order, with nothing lost. Real workers, real clients, no mocks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from django.db import connection, transaction
from django.test import override_settings

from realtime import publish, publish_many
from realtime.checks import check_read_database, check_settings
from realtime.worker.db import read_conninfo
from realtime.worker.listener import Listener
from tests.helpers import (
    BASE_DIR,
    WorkerProcess,
    closed_code,
    database_url_for_tests,
    get_token,
    logged_in,
    make_user,
    open_ws,
    start_worker,
    wait_until,
)
from tests.replica_support import Replica, ReplicaUnavailable, start_replica
from tests.test_delivery import assert_exactly_once_in_order, client_for, collect, committed_positions
from tests.test_notify_payload import RunningListener, table_events


@pytest.fixture(scope="module")
def replica(django_db_setup: None, django_db_blocker: object) -> Iterator[Replica]:
    """A hot standby of the cluster holding the test database, for this module's tests; removed after them."""
    with django_db_blocker.unblock():  # type: ignore[attr-defined]
        primary = database_url_for_tests()
    try:
        standby = start_replica(primary)
    except ReplicaUnavailable as exc:
        if not os.environ.get("DATABASE_URL"):
            raise  # the embedded server always allows it: a failure here is a bug
        pytest.skip(f"{exc} (DATABASE_URL names a server that does not allow replication from here)")
    try:
        yield standby
    finally:
        standby.destroy()


@pytest.fixture
def replica_worker(replica: Replica, transactional_db: None) -> Iterator[WorkerProcess]:
    """A worker reading the outbox from the replica, READ_MAX_LAG 0.5 s, AUTH_TIMEOUT 30 s; stopped after the test."""
    replica.resume()  # a failed test may have left replay paused
    process = start_worker(extra_env=replica.django_settings_env({"READ_MAX_LAG": 0.5, "AUTH_TIMEOUT": 30}))
    try:
        yield process
    finally:
        process.stop()
        process.log_path.unlink(missing_ok=True)


def publish_mixed(user, rounds: int, *, pause: float = 0.0) -> None:
    """Per round: 3 single events (each its own transaction, carried in the NOTIFY) and a batch of 20
    (a bare wake-up, read from the table)."""
    try:
        for round_ in range(rounds):
            for i in range(3):
                with transaction.atomic():
                    publish("single", {"round": round_, "i": i}, users=[user])
            with transaction.atomic():
                publish_many(
                    [{"event": "batch", "data": {"round": round_, "i": i}, "users": [user]} for i in range(20)]
                )
            time.sleep(pause)
    finally:
        connection.close()


# Settings and checks.


def test_e006_for_a_read_database_that_is_not_an_alias():
    """READ_DATABASE must name a DATABASES alias: anything else is realtime.E006 with a hint; a wrong type is E002."""
    with override_settings(REALTIME={"READ_DATABASE": "replcia"}):
        (error,) = check_read_database()
    assert error.id == "realtime.E006"
    assert error.msg == "REALTIME['READ_DATABASE'] = 'replcia' is not a DATABASES alias (the aliases are: 'default')."
    assert "streaming replica" in error.hint
    with override_settings(REALTIME={"READ_DATABASE": "default"}):
        assert check_read_database() == []
        assert read_conninfo() is not None
    assert check_read_database() == []
    assert read_conninfo() is None  # None: the listener reads the primary
    with override_settings(REALTIME={"READ_DATABASE": 5, "READ_MAX_LAG": 0}):
        messages = [m.msg for m in check_settings()]
    assert any("READ_DATABASE" in m for m in messages)
    assert any("READ_MAX_LAG" in m for m in messages)


# The listener alone, reading a real replica.


@pytest.mark.django_db(transaction=True)
def test_the_listener_reads_nothing_past_a_paused_replica_and_everything_after(replica: Replica):
    """With replay paused, the listener's cursor stops where the replica stopped (bare wake-ups and the
    single events after them wait), its lag grows in seconds and positions; once replay resumes, every
    event arrives once, in commit order, and the lag is 0 again."""
    replica.resume()
    user = make_user("alice")
    running = RunningListener()
    running.listener = Listener(
        database_url_for_tests(), running._collect, poll_interval=3600, read_conninfo=replica.conninfo()
    )
    with running:
        assert running.listener.read_conninfo != running.listener.conninfo
        with transaction.atomic():
            publish_many([{"event": "before", "users": [user]} for _ in range(20)])
        running.wait_for(table_events(0, 2**62)[-1].position)
        replica.wait_caught_up()
        replica.pause()
        shown = replica.query("SELECT coalesce(max(position), 0) FROM realtime_event")
        with transaction.atomic():  # a bare wake-up first: single events after it cannot follow the cursor
            publish_many([{"event": "held", "users": [user]} for _ in range(20)])
        publish_mixed(user, rounds=3)
        connection.close()
        committed = table_events(0, 2**62)
        time.sleep(1.0)
        assert running.listener.cursor == shown, "read past what the replica shows"
        assert max(e.position for e in running.delivered) == shown
        assert running.listener.lag_positions() >= committed[-1].position - shown
        assert running.listener.lag_seconds() >= 0.9
        replica.resume()
        running.wait_for(committed[-1].position)
        assert running.listener.lag_seconds() == 0
        assert running.listener.lag_positions() == 0
    assert running.delivered == committed  # once each, in commit order


# Real workers and clients.


def test_events_arrive_once_in_order_through_the_replica(replica_worker: WorkerProcess, replica: Replica):
    """Single events from 2 threads and batches, replicated as usual: every event arrives once, in order,
    and the worker's reading connection is on the replica (LISTEN on the primary)."""
    alice = make_user("alice")
    client = client_for(replica_worker, alice)
    client.connect()
    threads = [threading.Thread(target=publish_mixed, args=(alice, 5)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    expected = committed_positions(alice)
    assert len(expected) == 2 * 5 * 23
    assert_exactly_once_in_order(client, collect(client, len(expected)), expected)
    client.close()
    # One listener connection on each: LISTEN on the primary, reading on the replica.
    listeners = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'realtime-listener'"
    assert replica.query(listeners) == 1
    with connection.cursor() as cursor:
        cursor.execute(listeners + " AND datname = current_database()")
        assert cursor.fetchone()[0] == 1
    assert replica_worker.http("/readyz")[0] == 200
    assert replica_worker.metric("realtime_replica_lag_seconds") == 0


def realtime_status(replica: Replica) -> dict:
    """``manage.py realtime_status --json`` with the replica as READ_DATABASE (a process of its own)."""
    env = {**os.environ, "DATABASE_URL": database_url_for_tests(), **replica.django_settings_env()}
    result = subprocess.run(
        [sys.executable, "manage.py", "realtime_status", "--json"],
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_paused_replica_holds_delivery_back_and_loses_nothing(replica_worker: WorkerProcess, replica: Replica):
    """Replay paused during live traffic (batches and single events): a connected client receives
    nothing past the first event the replica does not show, /readyz turns 503 past READ_MAX_LAG,
    /metrics and realtime_status show the lag; a client resuming from an old id meanwhile gets its
    replay up to the worker's cursor once the replica has reached it, then the rest live. After
    resuming: everything, once, in order, and 200 again."""
    alice = make_user("alice")
    live = client_for(replica_worker, alice)
    live.connect()
    publish_mixed(alice, rounds=1)
    before = committed_positions(alice)
    assert_exactly_once_in_order(live, collect(live, len(before)), before)
    replica.wait_caught_up()
    replica.pause()
    # One event in its own transaction: its NOTIFY carries it, so the worker's cursor passes the replica.
    publish("carried", {}, users=[alice])
    (carried,) = collect(live, 1)
    with transaction.atomic():  # a bare wake-up: the worker must read it from the paused replica
        publish_many([{"event": "batch", "data": {"i": i}, "users": [alice]} for i in range(20)])
    publisher = threading.Thread(target=publish_mixed, args=(alice, 4), kwargs={"pause": 0.1})
    publisher.start()

    # A second client resumes from an old id while the replica is paused.
    resumed: dict = {"messages": []}
    resumed_all = threading.Event()
    token = get_token(logged_in(alice))  # in this thread: Django's test client is not thread-safe

    def resume_from_old_id() -> None:
        try:
            ws, resumed["welcome"] = open_ws(replica_worker, token, last_id=before[2])
            while not resumed_all.is_set() or resumed["messages"][-1]["id"] != resumed["last"]:
                resumed["messages"].append(json.loads(ws.recv(30)))
            ws.close()
        except Exception as exc:
            resumed["error"] = exc

    resumer = threading.Thread(target=resume_from_old_id)
    resumer.start()

    wait_until(lambda: replica_worker.http("/readyz")[0] == 503, "readyz 503 while the replica is paused")
    status, body = replica_worker.http("/readyz")
    assert status == 503 and "behind" in body
    assert replica_worker.metric("realtime_replica_lag_seconds") > 0.5
    assert replica_worker.metric("realtime_replica_lag_positions") >= 20
    publisher.join(60)
    connection.close()
    paused_status = realtime_status(replica)["replica"]
    assert paused_status["replay_paused"] is True
    assert paused_status["positions_behind"] >= 1 + 20 + 4 * 23
    assert paused_status["lag_s"] > 0
    with pytest.raises(TimeoutError):
        print("delivered past what the replica shows:", live.recv(0.5))
    assert resumed["welcome"]["last_id"] == carried["id"], "welcome.last_id is the worker's cursor"
    assert resumed["messages"] == [], "the replay must wait until the replica has reached the cursor"

    expected = committed_positions(alice)
    resumed["last"] = expected[-1]
    resumed_all.set()
    replica.resume()
    received = collect(live, len(expected) - len(before) - 1)
    assert [message["id"] for message in received] == expected[len(before) + 1 :]
    assert live.duplicates == 0
    resumer.join(60)
    assert "error" not in resumed, resumed.get("error")
    ids = [message["id"] for message in resumed["messages"] if message["type"] == "event"]
    assert ids == [position for position in expected if position > before[2]]  # no gap, nothing twice
    wait_until(lambda: replica_worker.http("/readyz")[0] == 200, "readyz 200 once caught up")
    assert replica_worker.metric("realtime_replica_lag_seconds") == 0
    assert realtime_status(replica)["replica"]["positions_behind"] == 0
    live.close()


def test_a_replay_the_replica_cannot_serve_in_time_is_closed_1013(replica: Replica, transactional_db: None):
    """A replay must reach the worker's cursor; when the replica stays behind it past AUTH_TIMEOUT the
    client is closed with 1013 (try again), not given a gap, and resumes completely once it caught up."""
    replica.resume()
    worker = start_worker(extra_env=replica.django_settings_env({"AUTH_TIMEOUT": 1.5}))
    try:
        alice = make_user("alice")
        live = client_for(worker, alice)
        live.connect()
        publish("first", {}, users=[alice])
        (first,) = collect(live, 1)
        replica.wait_caught_up()
        replica.pause()
        # One event in its own transaction: its NOTIFY carries it, so the worker's cursor passes the replica.
        publish("carried", {}, users=[alice])
        (carried,) = collect(live, 1)
        assert replica.query("SELECT max(position) FROM realtime_event") < carried["id"]
        ws, welcome = open_ws(worker, get_token(logged_in(alice)), last_id=first["id"] - 1)
        assert welcome["last_id"] == carried["id"]
        assert closed_code(ws) == 1013
        late = client_for(worker, alice)
        late.last_id = first["id"] - 1
        replica.resume()
        received = collect(late, 2)
        assert [message["id"] for message in received] == [first["id"], carried["id"]]
        assert late.duplicates == 0
        late.close()
        live.close()
    finally:
        replica.resume()
        worker.stop()
        worker.log_path.unlink(missing_ok=True)


def test_a_replica_restart_during_traffic_loses_nothing(replica_worker: WorkerProcess, replica: Replica):
    """The replica restarted (pg_ctl restart) while 2 threads publish batches and single events: the
    worker reconnects, and every committed event arrives once, in order; ready again afterwards."""
    alice = make_user("alice")
    client = client_for(replica_worker, alice)
    client.connect()
    threads = [threading.Thread(target=publish_mixed, args=(alice, 12), kwargs={"pause": 0.1}) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    replica.restart()
    for thread in threads:
        thread.join(120)
    expected = committed_positions(alice)
    assert len(expected) == 2 * 12 * 23
    assert_exactly_once_in_order(client, collect(client, len(expected), timeout=60), expected)
    assert "listener connection lost" in replica_worker.log(), "the restart did not reach the worker"
    wait_until(lambda: replica_worker.http("/readyz")[0] == 200, "ready after the restart")
    client.close()
