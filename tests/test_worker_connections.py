"""A worker gives back the database connections a burst made it open (issue 17): real worker, real PostgreSQL.

After a burst of logins the login pool (``realtime-auth``) shrinks back to one
connection; after a burst of replays with persistent Django connections
(``CONN_MAX_AGE``), the threads that ran a burst's topic checks and replays
close theirs once idle.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from django.db import connection
from websockets.sync.client import ClientConnection

from realtime import publish
from realtime.models import Event
from realtime.worker.server import THREAD_IDLE_RELEASE
from realtime.worker.verifier import POOL_IDLE_SECONDS, POOL_SIZE
from tests.helpers import (
    WorkerProcess,
    get_token,
    logged_in,
    make_user,
    open_ws,
    proc_status,
    receive,
    start_worker,
)

pytestmark = pytest.mark.django_db(transaction=True)


def held(application_name: str) -> int:
    """Connections to the test database with this application_name."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND datname = current_database()",
            [application_name],
        )
        return int(cursor.fetchone()[0])


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.25)
    return condition()


def burst(
    worker: WorkerProcess, tokens: list[str], count: str, last_id: int | None = None, topics: list[str] | None = None
) -> int:
    """Open one connection per token, 32 at a time (each waits for its topics' answers), then close them all.

    Returns the most connections named ``count`` seen during the burst and once every connection is in.
    """
    peak = 0

    def login(token: str) -> ClientConnection:
        ws, _ = open_ws(worker, token, last_id=last_id, topics=topics)
        answered = 0
        while answered < len(topics or ()):
            answered += receive(ws)["type"] == "subscribed"
        return ws

    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(login, token) for token in tokens]
        while not all(f.done() for f in futures):
            peak = max(peak, held(count))
            time.sleep(0.02)
        sockets = [future.result() for future in futures]
        peak = max(peak, held(count))
        list(pool.map(lambda ws: ws.close(), sockets))
    return peak


def tokens(users: int, each: int) -> list[str]:
    """``each`` connection tokens for each of ``users`` new users (under MAX_CONNECTIONS_PER_USER, 20)."""
    found = []
    for n in range(users):
        web = logged_in(make_user(f"user{n}"))
        found += [get_token(web) for _ in range(each)]
    return found


def test_login_pool_shrinks_back_after_a_burst(worker):
    """A burst of logins grows the realtime-auth pool; idle, it gives the connections back down to one."""
    peak = burst(worker, tokens(6, 16), "realtime-auth")
    assert 1 < peak <= POOL_SIZE
    # psycopg_pool closes one idle connection per POOL_IDLE_SECONDS.
    assert wait_until(lambda: held("realtime-auth") == 1, POOL_IDLE_SECONDS * (POOL_SIZE + 2)), held("realtime-auth")


@contextlib.contextmanager
def most_seen(measure: Callable[[], int]) -> Iterator[list[int]]:
    """Sample ``measure`` every 10 ms in a thread while the block runs; the list holds the highest value."""
    highest = [measure()]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            highest[0] = max(highest[0], measure())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield highest
    finally:
        done.set()
        sampler.join()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="counts threads in /proc")
def test_idle_threads_close_their_persistent_connections_and_stop(transactional_db):
    """With CONN_MAX_AGE, threads that ran a burst of logins and replays close their connections once idle, and stop."""
    name = "realtime-threads-test"
    worker = start_worker(
        extra_env={
            "DJANGO_SETTINGS_MODULE": "tests.persistent_db_settings",
            "REALTIME_TEST_APPLICATION_NAME": name,
            "REALTIME_TEST_OVERRIDES": json.dumps({"TOPIC_POLICY": "tests.topic_policies.queries_slowly"}),
        }
    )
    try:
        publish("before", {}, everyone=True)
        first = Event.objects.get(name="before").position
        for n in range(20):
            publish("missed", {"n": n}, everyone=True)
        # The topic policy (a query, then a pause) and the replays run in the worker's threads, each
        # on its thread's connection: 32 logins at a time keep many threads busy at once.
        pid = worker.process.pid
        at_rest = proc_status(pid, "Threads")
        logins = tokens(4, 16)
        with most_seen(lambda: proc_status(pid, "Threads")) as threads_peak:
            assert burst(worker, logins, name, last_id=first, topics=["news"]) > 1
        assert threads_peak[0] > at_rest + 4, (at_rest, threads_peak)
        # Presence writes every few seconds may keep one thread (and its connection) warm.
        assert wait_until(lambda: held(name) <= 1, THREAD_IDLE_RELEASE + 15), held(name)
        # The burst's threads are gone too: a worker's threads follow its load, not its busiest moment.
        assert wait_until(lambda: proc_status(pid, "Threads") <= at_rest + 1, 5), proc_status(pid, "Threads")
        assert "Traceback" not in worker.log()
    finally:
        worker.stop()
