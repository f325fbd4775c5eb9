"""The worker's thread pool: ORM work off the event loop, without idle threads holding database sessions.

Django keeps one database connection per thread. With ``CONN_MAX_AGE`` > 0
(persistent connections), a thread of a plain ``ThreadPoolExecutor`` keeps its
connection as long as it sits idle, because ``close_old_connections()`` runs
only when that thread runs again: after one burst of replays a worker would
hold ``THREADS`` sessions for good, and the burst's threads forever. In
:class:`ReleasingExecutor` a thread idle for ``release_after`` seconds closes
its own connections (``connections.close_all()`` in that thread; with Django's
connection pool they go back to the pool) and stops, and the most recently
idle thread takes the next job: a steady trickle of work (presence writes
every few seconds) keeps one thread and its connection warm instead of waking
every thread in turn, and the threads a worker holds follow its load of the
last ``release_after`` seconds, not the highest it ever had.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from django.db import connections

__all__ = ["ReleasingExecutor", "release_connections"]

logger = logging.getLogger("realtime.server")

_Item = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


def release_connections() -> None:
    """Close this thread's Django database connections (with Django's pool: give them back to it)."""
    connections.close_all()


class ReleasingExecutor(ThreadPoolExecutor):
    """At most ``max_workers`` threads; a thread idle for ``release_after`` seconds releases its connections and stops.

    Threads start on demand (when a job finds no idle thread). Jobs go to the
    most recently idle thread (last in, first out); when all ``max_workers``
    threads are busy, they wait in order. A thread that has waited
    ``release_after`` seconds for its next job calls ``release`` (default
    :func:`release_connections`) in its own thread and stops; so does every
    thread at :meth:`shutdown`.

    A ``ThreadPoolExecutor`` by type only (asyncio's ``set_default_executor()``
    accepts nothing else): :meth:`submit` and :meth:`shutdown` are its own.
    """

    def __init__(
        self,
        max_workers: int,
        *,
        release_after: float,
        thread_name_prefix: str = "realtime-db",
        release: Callable[[], None] = release_connections,
    ) -> None:
        super().__init__(max_workers, thread_name_prefix)  # validates; starts no thread
        self.max_workers = max_workers
        self.release_after = release_after
        self.thread_name_prefix = thread_name_prefix
        self.release = release
        self._mutex = threading.Lock()
        self._idle_inboxes: list[queue.SimpleQueue[_Item | None]] = []  # a stack: the last one idled is woken first
        self._backlog: collections.deque[_Item] = collections.deque()
        self._alive: list[threading.Thread] = []  # alive, stopping ones included
        self._taking_jobs = 0  # alive and not stopping: what max_workers bounds
        self._names = itertools.count()
        self._closing = False

    @property
    def threads(self) -> int:
        """How many threads are running (busy or idle)."""
        return len(self._alive)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Schedule ``fn(*args, **kwargs)``; return its future (RuntimeError after :meth:`shutdown`)."""
        future: Future[Any] = Future()
        item: _Item = (future, fn, args, kwargs)
        with self._mutex:
            if self._closing:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self._idle_inboxes:
                self._idle_inboxes.pop().put(item)
            elif self._taking_jobs < self.max_workers:
                thread = threading.Thread(
                    target=self._work, args=(item,), name=f"{self.thread_name_prefix}_{next(self._names)}", daemon=True
                )
                self._alive.append(thread)
                self._taking_jobs += 1
                thread.start()
            else:
                self._backlog.append(item)
        return future

    def _work(self, first: _Item) -> None:
        inbox: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        item: _Item | None = first
        stopping_idle = False
        try:
            while item is not None:
                future, fn, args, kwargs = item
                if future.set_running_or_notify_cancel():
                    try:
                        result = fn(*args, **kwargs)
                    except BaseException as exc:
                        future.set_exception(exc)
                    else:
                        future.set_result(result)
                del item, future, fn, args, kwargs
                with self._mutex:
                    if self._backlog:
                        item = self._backlog.popleft()
                        continue
                    if self._closing:
                        return
                    self._idle_inboxes.append(inbox)
                while True:
                    try:
                        item = inbox.get(timeout=self.release_after)
                        break
                    except queue.Empty:
                        with self._mutex:
                            if inbox in self._idle_inboxes:  # else a job (or shutdown's None) is on its way
                                self._idle_inboxes.remove(inbox)
                                # Counted out now, not after release(): a job submitted meanwhile
                                # starts a thread instead of waiting in the backlog for this one.
                                self._taking_jobs -= 1
                                stopping_idle = True
                                return
        finally:
            try:
                self.release()
            except Exception as exc:  # the thread stops all the same; its connections die with it
                logger.warning("an idle thread could not close its database connections: %r", exc)
            with self._mutex:
                if not stopping_idle:
                    self._taking_jobs -= 1
                self._alive.remove(threading.current_thread())

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new jobs, finish the queued ones (or cancel them), stop the threads (``wait``: join them)."""
        with self._mutex:
            self._closing = True
            if cancel_futures:
                while self._backlog:
                    self._backlog.popleft()[0].cancel()
            for inbox in self._idle_inboxes:
                inbox.put(None)
            self._idle_inboxes.clear()
        if wait:
            for thread in list(self._alive):
                thread.join()
