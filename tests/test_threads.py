"""The worker's thread pool (realtime.worker.threads): threads follow the load, idle ones let go and stop."""

from __future__ import annotations

import threading
import time

import pytest

from realtime.worker.threads import ReleasingExecutor
from tests.helpers import WAIT, wait_until

RELEASE_AFTER = 0.2


class Releases:
    """Counts calls, by thread name: the executor's ``release`` hook."""

    def __init__(self) -> None:
        self.by = []
        self.lock = threading.Lock()

    def __call__(self) -> None:
        with self.lock:
            self.by.append(threading.current_thread().name)


@pytest.fixture
def releases() -> Releases:
    return Releases()


@pytest.fixture
def executor(releases: Releases):
    pool = ReleasingExecutor(8, release_after=RELEASE_AFTER, release=releases)
    yield pool
    pool.shutdown()


def test_a_burst_starts_threads_that_release_and_stop_once_idle(executor: ReleasingExecutor, releases: Releases):
    gate = threading.Event()
    futures = [executor.submit(gate.wait, WAIT) for _ in range(6)]
    wait_until(lambda: executor.threads == 6, "executor.threads == 6")
    gate.set()
    assert all(f.result(WAIT) for f in futures)
    # Idle for release_after: each one releases its connections, in its own thread, and stops.
    wait_until(lambda: executor.threads == 0, "executor.threads == 0")
    assert len(releases.by) == 6
    assert len(set(releases.by)) == 6
    # The pool still works after its threads stopped.
    assert executor.submit(lambda: 42).result(WAIT) == 42


def test_a_trickle_of_work_keeps_one_thread(releases: Releases):
    pool = ReleasingExecutor(8, release_after=WAIT, release=releases)
    try:
        names = set()
        for _ in range(20):
            names.add(pool.submit(lambda: threading.current_thread().name).result(WAIT))
            # It hands back its result, then idles.
            wait_until(lambda: len(pool._idle_inboxes) == 1, "len(pool._idle_inboxes) == 1")
        assert len(names) == 1
        assert pool.threads == 1
    finally:
        pool.shutdown()


def test_the_most_recently_idle_thread_takes_the_next_job(executor: ReleasingExecutor):
    gate = threading.Event()
    first = executor.submit(lambda: (gate.wait(WAIT), threading.current_thread().name)[1])
    second = executor.submit(lambda: threading.current_thread().name)
    second_name = second.result(WAIT)  # two threads: the first is still busy
    # A thread hands back its result before it queues itself as idle: wait for that, in order.
    wait_until(lambda: len(executor._idle_inboxes) == 1, "len(executor._idle_inboxes) == 1")
    gate.set()
    first_name = first.result(WAIT)
    assert first_name != second_name
    wait_until(lambda: len(executor._idle_inboxes) == 2, "len(executor._idle_inboxes) == 2")
    assert executor.submit(lambda: threading.current_thread().name).result(WAIT) == first_name


@pytest.mark.parametrize("max_workers", [1, 2])
def test_jobs_beyond_max_workers_wait_their_turn(releases: Releases, max_workers: int):
    pool = ReleasingExecutor(max_workers, release_after=RELEASE_AFTER, release=releases)
    try:
        gate = threading.Event()
        order: list[int] = []
        blockers = [pool.submit(gate.wait, WAIT) for _ in range(max_workers)]
        queued = [pool.submit(order.append, n) for n in range(5)]
        time.sleep(0.05)
        assert pool.threads == max_workers
        assert order == []
        gate.set()
        for future in blockers + queued:
            future.result(WAIT)
        assert pool.threads <= max_workers
        # The backlog is taken from its head; with one thread, that is the order they run in.
        assert order == list(range(5)) if max_workers == 1 else sorted(order) == list(range(5))
    finally:
        pool.shutdown()


def test_a_job_submitted_while_every_thread_stops_still_runs(releases: Releases):
    """A thread counts itself out when it decides to stop, not once its release is done."""
    release_started = threading.Event()
    release_done = threading.Event()

    def slow_release() -> None:
        release_started.set()
        release_done.wait(WAIT)

    pool = ReleasingExecutor(1, release_after=RELEASE_AFTER, release=slow_release)
    try:
        pool.submit(lambda: None).result(WAIT)
        assert release_started.wait(WAIT)  # the only thread is stopping, inside release()
        assert pool.submit(lambda: "ran").result(WAIT) == "ran"
    finally:
        release_done.set()
        pool.shutdown()


def test_shutdown_finishes_queued_jobs_and_joins(releases: Releases):
    pool = ReleasingExecutor(1, release_after=60, release=releases)
    gate = threading.Event()
    pool.submit(gate.wait, WAIT)
    queued = pool.submit(lambda: "done")
    threading.Timer(0.1, gate.set).start()
    pool.shutdown()
    assert queued.result(0) == "done"
    assert pool.threads == 0
    assert len(releases.by) == 1
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None)


def test_a_release_that_fails_still_stops_the_thread(caplog):
    def failing_release() -> None:
        raise RuntimeError("connection already broken")

    pool = ReleasingExecutor(1, release_after=RELEASE_AFTER, release=failing_release)
    try:
        assert pool.submit(lambda: 1).result(WAIT) == 1
        wait_until(lambda: pool.threads == 0, "pool.threads == 0")
        assert "could not close its database connections" in caplog.text
        assert pool.submit(lambda: 2).result(WAIT) == 2  # its place was given back
    finally:
        pool.shutdown()
