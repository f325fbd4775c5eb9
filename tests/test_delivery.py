"""Delivery under faults: nothing committed is lost, nothing is sent twice, order is kept.

Real processes throughout: worker processes, the embedded PostgreSQL (restarted
for real), and the Python client ``realtime.client`` reconnecting on its own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from django.db import OperationalError, connection, transaction
from django.utils import timezone

from realtime import publish
from realtime.client import RealtimeClient
from realtime.models import Event
from realtime.retention import prune
from tests.helpers import BASE_DIR, ORIGIN, WAIT, get_token, logged_in, make_user, start_worker

pytestmark = pytest.mark.django_db(transaction=True)


def client_for(worker, user, **kwargs) -> RealtimeClient:
    web = logged_in(user)
    lock = threading.Lock()

    def token() -> str:
        with lock:  # Django's test client is not thread-safe
            return get_token(web)

    return RealtimeClient(worker.url, token, origin=ORIGIN, **kwargs)


def collect(client: RealtimeClient, count: int, timeout: float = 60.0) -> list[dict]:
    """Receive ``count`` events (failing on a reset) within ``timeout``."""
    received: list[dict] = []
    deadline = time.monotonic() + timeout
    while len(received) < count:
        message = client.recv(max(0.01, deadline - time.monotonic()))
        assert message["type"] == "event", message
        received.append(message)
    return received


def publish_concurrently(user, threads: int, per_thread: int, retry: bool = False, pause: float = 0.001) -> None:
    """Publish ``threads * per_thread`` events from several threads, each in its own transaction."""
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            for i in range(per_thread):
                while True:
                    try:
                        with transaction.atomic():
                            publish("tick", {"thread": n, "i": i}, users=[user])
                        break
                    except OperationalError:
                        # The server went away: this transaction did not commit (or its fate is
                        # unknown); the outbox is the truth, checked at the end.
                        connection.close()
                        if not retry:
                            raise
                        time.sleep(0.05)
                time.sleep(pause)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(120)
    assert not errors, errors


def committed_positions(user) -> list[int]:
    return list(Event.objects.filter(users__contains=[user.pk]).order_by("position").values_list("position", flat=True))


def assert_exactly_once_in_order(client: RealtimeClient, received: list[dict], expected: list[int]) -> None:
    ids = [message["id"] for message in received]
    assert ids == expected  # every committed event, once, in commit order
    assert client.duplicates == 0  # the server never re-sent one


def while_running(action: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=action)
    thread.start()
    return thread


def terminate_listener() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            # This test database's listeners only: other runs may share the server.
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = 'realtime-listener' AND datname = current_database()"
        )
        return cursor.fetchone()[0]


def test_listener_killed_twice_during_a_stream_loses_nothing(worker):
    """600 events from 4 threads while the listener's backends are terminated twice: all arrive once, in order."""
    alice = make_user("alice")
    clients = [client_for(worker, alice) for _ in range(3)]
    for client in clients:
        client.connect()  # now, so the stream arrives live, not replayed
    heal_times: list[float] = []

    def kill_twice() -> None:
        for _ in range(2):
            time.sleep(0.4)
            killed_at = time.monotonic()
            assert terminate_listener() == 2
            while worker.http("/readyz")[0] != 200 or time.monotonic() - killed_at < 0.01:
                time.sleep(0.005)
            heal_times.append(time.monotonic() - killed_at)

    killer = while_running(kill_twice)
    publish_concurrently(alice, threads=4, per_thread=150)
    killer.join(60)
    expected = committed_positions(alice)
    assert len(expected) == 600
    for client in clients:
        assert_exactly_once_in_order(client, collect(client, 600), expected)
        assert client.connections == 1  # clients never noticed: only the listener reconnected
        client.close()
    assert len(heal_times) == 2
    print(f"listener healed in {', '.join(f'{t * 1000:.0f} ms' for t in heal_times)}")


@pytest.mark.skipif(bool(os.environ.get("DATABASE_URL")), reason="restarts the embedded PostgreSQL only")
def test_postgresql_restart_mid_stream_loses_nothing(worker):
    """PostgreSQL restarted while 4 threads publish: readyz is 503 meanwhile, then all committed events arrive once."""
    import pgserver._commands as pg_commands

    alice = make_user("alice")
    client = client_for(worker, alice)
    client.connect()
    statuses: list[int] = []
    done = threading.Event()

    def watch_readiness() -> None:
        while not done.is_set():
            with contextlib.suppress(OSError):
                statuses.append(worker.http("/readyz")[0])
            time.sleep(0.02)

    committed_before_restart: list[int] = []

    def restart() -> None:
        time.sleep(0.5)
        committed_before_restart.append(Event.objects.filter(position__isnull=False).count())
        connection.close()
        pgdata = Path(os.environ.get("REALTIME_PGDATA") or BASE_DIR / ".pgdata")
        user = "pgserver" if os.geteuid() == 0 else None
        pg_commands.pg_ctl(["-w", "restart", "-m", "fast"], pgdata=pgdata, user=user, timeout=60)

    watcher = while_running(watch_readiness)
    restarter = while_running(restart)
    publish_concurrently(alice, threads=4, per_thread=100, retry=True, pause=0.01)
    restarter.join(90)
    connection.close()
    expected = committed_positions(alice)
    assert len(expected) == 400
    received = collect(client, len(expected))
    done.set()
    watcher.join(10)
    assert 0 < committed_before_restart[0] < 400, "the restart happened mid-stream"
    assert_exactly_once_in_order(client, received, expected)
    assert 503 in statuses, "readyz must say 503 while the listener is down"
    assert worker.http("/readyz")[0] == 200
    client.close()


def test_two_workers_one_killed_clients_resume_on_the_other(transactional_db):
    """Two workers on one port; one is SIGKILLed mid-stream; its clients reconnect and miss nothing."""
    workers = start_worker(args=("--workers", "2"))
    try:
        alice = make_user("alice")
        clients = [client_for(workers, alice) for _ in range(8)]
        for client in clients:
            client.connect()
        children = psutil.Process(workers.process.pid).children()
        by_pid = {
            child.pid: [
                c for c in child.net_connections("tcp") if c.status == "ESTABLISHED" and c.laddr.port == workers.port
            ]
            for child in children
            if "multiprocessing.spawn" in " ".join(child.cmdline())
        }
        assert len(by_pid) == 2
        victim = max(by_pid, key=lambda pid: len(by_pid[pid]))
        assert by_pid[victim], "some clients are on the worker to kill"

        def kill() -> None:
            time.sleep(0.3)
            os.kill(victim, signal.SIGKILL)

        killer = while_running(kill)
        # About 0.75 s of publishing: the kill at 0.3 s lands mid-stream, however fast the machine.
        publish_concurrently(alice, threads=2, per_thread=150, pause=0.005)
        killer.join(10)
        expected = committed_positions(alice)
        assert len(expected) == 300
        for client in clients:
            assert_exactly_once_in_order(client, collect(client, 300), expected)
        assert sum(client.connections > 1 for client in clients) >= 1, "a client had to reconnect"
        for client in clients:
            client.close()
    finally:
        assert workers.stop() == 0


def test_offline_client_resumes_1000_events_in_order(worker):
    """A client away while 1,000 events are published gets all of them on return, in order."""
    alice = make_user("alice")
    client = client_for(worker, alice)
    client.connect()
    client.close()
    for n in range(1000):
        publish("while-away", {"n": n}, users=[alice])
    received = collect(client, 1000)
    assert [m["data"]["n"] for m in received] == list(range(1000))
    assert client.connections == 2


def test_publish_without_any_worker_commits_and_is_delivered_later(transactional_db):
    """With no worker listening, publish still commits; a client resuming later receives it."""
    alice = make_user("alice")
    first = start_worker()
    client = client_for(first, alice)
    client.connect()
    client.close()
    port = first.port
    first.stop()
    publish("while-down", {"n": 1}, users=[alice])
    assert Event.objects.get(name="while-down").position is not None
    second = start_worker(port=port)
    try:
        (message,) = collect(client, 1)
        assert message["event"] == "while-down"
    finally:
        client.close()
        second.stop()


def test_cursor_older_than_retention_gets_reset(worker):
    """Once events after a client's cursor are pruned, the client is told to reset instead of a partial replay."""
    alice = make_user("alice")
    client = client_for(worker, alice)
    client.connect()
    client.close()
    for n in range(5):
        publish("old", {"n": n}, users=[alice])
    Event.objects.filter(name="old").update(created_at=timezone.now() - timezone.timedelta(days=2))
    assert prune(24 * 3600) == 5
    publish("new", {}, users=[alice])
    reset = client.recv(WAIT)
    assert reset["type"] == "reset"
    assert client.resets == 1
    # After the reset, the client continues with live events.
    publish("after-reset", {}, users=[alice])
    assert client.recv(WAIT)["event"] == "after-reset"
    client.close()
