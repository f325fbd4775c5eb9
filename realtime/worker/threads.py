"""The worker's thread pool: ORM work off the event loop, without idle threads holding database sessions.

Django keeps one database connection per thread. With ``CONN_MAX_AGE`` > 0
(persistent connections), a thread of a plain ``ThreadPoolExecutor`` keeps its
connection as long as it sits idle, because ``close_old_connections()`` runs
only when that thread runs again: after one burst of replays a worker would
hold ``THREADS`` sessions for good. In :class:`ReleasingExecutor` a thread
closes its own connections (``connections.close_all()`` in that thread; with
Django's connection pool they go back to the pool) once it has been idle for
``release_after`` seconds, and the most recently idle thread takes the next
job: a steady trickle of work (presence writes every few seconds) keeps one
thread and its connection warm instead of waking every thread in turn, each
reconnecting.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from django.db import connections

__all__ = ["ReleasingExecutor", "release_connections"]

_Item = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


def release_connections() -> None:
    """Close this thread's Django database connections (with Django's pool: give them back to it)."""
    connections.close_all()


class ReleasingExecutor(ThreadPoolExecutor):
    """At most ``max_workers`` threads; a thread idle for ``release_after`` seconds releases its connections.

    Threads start on demand (when a job finds no idle thread) and stop at
    :meth:`shutdown`. Jobs go to the most recently idle thread (last in, first
    out); when all ``max_workers`` threads are busy, they wait in order. A
    thread that ran something and then waited ``release_after`` seconds calls
    ``release`` (default :func:`release_connections`) once, in its own
    thread, and again when it stops.

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
        self._started: list[threading.Thread] = []
        self._closing = False

    @property
    def threads(self) -> int:
        """How many threads have been started."""
        return len(self._started)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Schedule ``fn(*args, **kwargs)``; return its future (RuntimeError after :meth:`shutdown`)."""
        future: Future[Any] = Future()
        item: _Item = (future, fn, args, kwargs)
        with self._mutex:
            if self._closing:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self._idle_inboxes:
                self._idle_inboxes.pop().put(item)
            elif len(self._started) < self.max_workers:
                thread = threading.Thread(
                    target=self._work, args=(item,), name=f"{self.thread_name_prefix}_{len(self._started)}", daemon=True
                )
                self._started.append(thread)
                thread.start()
            else:
                self._backlog.append(item)
        return future

    def _work(self, first: _Item) -> None:
        inbox: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        item: _Item | None = first
        holding = False  # ran something since it last released its connections
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
                holding = True
                with self._mutex:
                    if self._backlog:
                        item = self._backlog.popleft()
                        continue
                    if self._closing:
                        return
                    self._idle_inboxes.append(inbox)
                while True:
                    try:
                        item = inbox.get(timeout=self.release_after if holding else None)
                        break
                    except queue.Empty:
                        self.release()
                        holding = False
        finally:
            if holding:
                self.release()

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
            for thread in list(self._started):
                thread.join()
