"""The websocket worker: its parts, its lifecycle, and the HTTP routes on its port.

One :class:`Worker` per process puts together:

- a :class:`~realtime.worker.listener.Listener`, which feeds committed events
  in commit order to a :class:`~realtime.worker.fanout.Fanout` (routing) and
  its :class:`~realtime.worker.control.Control` (logouts, rights changes);
- a :class:`~realtime.worker.registry.Registry` of the connected clients,
  which tells the :class:`~realtime.worker.presence.PresenceTracker` of each change;
- a websockets server whose handler is a
  :class:`~realtime.worker.connection.ConnectionHandler`, and whose
  ``process_request`` answers ``GET /healthz`` (200 while the process serves),
  ``GET /readyz`` (200 while the listener is connected and its read database lags
  by at most ``READ_MAX_LAG`` seconds, else 503) and
  ``GET /metrics`` (Prometheus text).

:func:`serve_forever` is a worker process's main, for ``runwebsockets`` and its supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import threading
from collections.abc import Awaitable
from http import HTTPStatus
from typing import Any

from django.db import DatabaseError
from prometheus_client import CONTENT_TYPE_LATEST
from websockets.asyncio.server import Server, ServerConnection, serve, unix_serve
from websockets.http11 import Request, Response

from realtime import retention
from realtime.conf import settings
from realtime.worker.connection import ConnectionHandler
from realtime.worker.control import Control
from realtime.worker.db import listen_conninfo, run_sync
from realtime.worker.fanout import Fanout, spawner
from realtime.worker.handshake import allowed_origins, format_address
from realtime.worker.limits import BACKLOG, connection_limit, guarded_connection, reserved_files
from realtime.worker.listener import Listener
from realtime.worker.logs import log_to_stderr_unless_configured
from realtime.worker.memory import collect_garbage_forever, return_freed_memory_to_os, tune_garbage_collector
from realtime.worker.metrics import Metrics
from realtime.worker.presence import PresenceTracker
from realtime.worker.registry import Registry
from realtime.worker.threads import ReleasingExecutor
from realtime.worker.verifier import Verifier

__all__ = ["THREAD_IDLE_RELEASE", "Worker", "serve_forever", "wait_for_stop_signal"]

logger = logging.getLogger("realtime.server")

# Seconds a thread of the worker's pool waits idle before closing its database connections: longer
# than the gaps between a burst's jobs, so a busy thread keeps its connection (see docs/scaling.md).
THREAD_IDLE_RELEASE = 10.0


def wait_for_stop_signal() -> asyncio.Future[None]:
    """Return a future that completes on the first SIGINT or SIGTERM (call inside the loop)."""
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    if threading.current_thread() is not threading.main_thread():
        # Under the autoreloader (--reload) the main thread owns the signals and ends the process.
        return stop

    def stop_once() -> None:
        if not stop.done():
            stop.set_result(None)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop_once)
    return stop


def serve_forever(
    host: str | None,
    port: int | None,
    *,
    name: str = "worker",
    unix_path: str | None = None,
    keep_open: float = 0.0,
    reuse_port: bool = False,
    parent_pid: int | None = None,
) -> None:
    """Run one worker process until SIGINT or SIGTERM (or until ``parent_pid`` is gone).

    Raises:
        OSError: if it cannot listen.
    """
    log_to_stderr_unless_configured()
    return_freed_memory_to_os()
    tune_garbage_collector()

    async def main() -> None:
        stop = wait_for_stop_signal()
        if parent_pid is not None:
            asyncio.get_running_loop().create_task(_stop_when_orphaned(parent_pid, stop))
        options: dict[str, Any] = {"reuse_port": True} if reuse_port else {}
        await Worker(name=name).run(host, port, stop, unix_path=unix_path, keep_open=keep_open, **options)

    asyncio.run(main())


async def _stop_when_orphaned(parent_pid: int, stop: asyncio.Future[None]) -> None:
    """A supervisor killed with SIGKILL leaves its workers: they stop, not serve on beside the next one."""
    while not stop.done():
        await asyncio.sleep(1.0)
        if os.getppid() != parent_pid:
            logger.warning("supervisor (pid %d) is gone: stopping", parent_pid)
            stop.set_result(None)


class Worker:
    """One websocket worker process: listener, registry, routing and server."""

    def __init__(self, *, conninfo: str | None = None, name: str = "worker") -> None:
        self.name = name
        self.metrics = Metrics()
        self._background: set[asyncio.Task[Any]] = set()
        self.presence = PresenceTracker(cursor=lambda: self.listener.cursor)
        self.registry = Registry(observer=self.presence)
        self.verifier = Verifier()
        self.fanout = Fanout(self.registry, self.metrics, spawner(self._background))
        self.control = Control(self.registry, self.verifier, self.fanout)
        self.fanout.control = self.control
        self.listener = Listener(conninfo or listen_conninfo(), self.fanout.deliver, settings.BATCH_SIZE)
        self.handler = ConnectionHandler(
            registry=self.registry,
            listener=self.listener,
            verifier=self.verifier,
            fanout=self.fanout,
            control=self.control,
            metrics=self.metrics,
        )
        self.metrics.listener_up.set_function(lambda: 1 if self.listener.ready else 0)
        self.metrics.replica_lag.set_function(self.listener.lag_seconds)
        self.metrics.replica_lag_positions.set_function(self.listener.lag_positions)
        self.metrics.connections.set_function(lambda: len(self.registry))
        self.metrics.worker.info({"name": name, "pid": str(os.getpid())})
        self.metrics.registry_keys.set_function(self.registry.index_keys)
        # Read at scrape time, in the loop's thread.
        self.metrics.presence.labels("live").set_function(lambda: self.presence.sizes()[0])
        self.metrics.presence.labels("written").set_function(lambda: self.presence.sizes()[1])
        self.max_connections = settings.MAX_CONNECTIONS
        self.server: Server | None = None

    async def run(
        self,
        host: str | None,
        port: int | None,
        stop: Awaitable[Any],
        *,
        unix_path: str | None = None,
        keep_open: float = 0.0,
        **serve_kwargs: Any,
    ) -> None:
        """Serve until ``stop`` completes, then close clients with 1001.

        Listens on ``host:port``, or on the Unix socket ``unix_path``. With
        ``keep_open`` seconds, stopping first closes the listening socket only
        (new connections are refused) and keeps serving open connections until
        they leave or the time runs out, for rolling deploys.
        """
        loop = asyncio.get_running_loop()
        # The default executor has min(32, cpus + 4) threads: too few for a burst of logins. Its threads
        # close their Django connections once idle: a burst of replays must not hold THREADS sessions for good.
        loop.set_default_executor(ReleasingExecutor(settings.THREADS, release_after=THREAD_IDLE_RELEASE))
        # /metrics is rendered in process_request, in this loop's thread.
        self.metrics.tasks.set_function(lambda: len(asyncio.all_tasks(loop)))
        await self.verifier.open()
        self._set_connection_limit()
        tasks = [
            asyncio.create_task(self.listener.run(), name="realtime-listener"),
            asyncio.create_task(self._prune_forever(), name="realtime-pruner"),
            asyncio.create_task(self.control.revalidate_forever(), name="realtime-revalidate"),
            asyncio.create_task(self.presence.run(), name="realtime-presence"),
            asyncio.create_task(collect_garbage_forever(self.metrics.gc_pause.observe), name="realtime-gc"),
        ]
        options: dict[str, Any] = {
            "process_request": self.process_request,
            "origins": allowed_origins(),
            "server_header": settings.SERVER_HEADER,
            "max_size": settings.MAX_MESSAGE_SIZE,
            "ping_interval": settings.PING_INTERVAL,
            "ping_timeout": settings.PING_TIMEOUT,
            "close_timeout": settings.CLOSE_TIMEOUT,
            "compression": settings.COMPRESSION,
            "create_connection": guarded_connection(lambda: self.max_connections),
            "backlog": BACKLOG,
            **serve_kwargs,
        }
        try:
            if unix_path is not None:
                server = await unix_serve(self.handler, unix_path, **options)
            else:
                server = await serve(self.handler, host, port, **options)
            self.server = server
            try:
                for sock in server.sockets:
                    address = unix_path or format_address(sock.getsockname())
                    logger.info("%s (pid %d) listening on %s", self.name, os.getpid(), address)
                await stop
                if keep_open > 0:
                    # Stop accepting; keep delivering to who is here until they leave.
                    server.server.close()
                    logger.info(
                        "stopped accepting; keeping %d connection(s) open for up to %ss", len(self.registry), keep_open
                    )
                    deadline = loop.time() + keep_open
                    while server.connections and loop.time() < deadline:
                        await asyncio.sleep(0.1)
                logger.info("shutting down: closing %d connection(s) with 1001", len(server.connections))
            finally:
                server.close()
                await server.wait_closed()
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self.presence.close()
            await self.verifier.close()

    def _set_connection_limit(self) -> None:
        self.max_connections = connection_limit()
        if self.max_connections < settings.MAX_CONNECTIONS and "MAX_CONNECTIONS" in settings.explicit:
            logger.warning(
                "MAX_CONNECTIONS is %d, but this process may open only %d files: serving at most %d connections "
                "(raise the open-files limit: LimitNOFILE= in systemd, ulimit -n in a shell)",
                settings.MAX_CONNECTIONS,
                self.max_connections + reserved_files(),
                self.max_connections,
            )
        else:
            logger.info("serving at most %d connections", self.max_connections)

    async def _prune_forever(self) -> None:
        """Prune expired events now and then; several workers doing so is harmless."""
        while True:
            # Jitter keeps the workers of a deployment from pruning in step.
            await asyncio.sleep(settings.PRUNE_INTERVAL * random.uniform(0.5, 1.5))
            try:
                deleted = await run_sync(retention.prune, settings.RETENTION)
            except DatabaseError as exc:
                logger.warning("pruning failed, will retry: %s", exc)
                continue
            if deleted:
                logger.info("pruned %d event(s) older than %ss", deleted, settings.RETENTION)

    # HTTP on the websocket port.

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            return connection.respond(HTTPStatus.OK, "OK\n")
        if path == "/readyz":
            if self.listener.ready and (lag := self.listener.lag_seconds()) > settings.READ_MAX_LAG:
                return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, f"read database {lag:.1f}s behind\n")
            if self.listener.ready:
                return connection.respond(HTTPStatus.OK, "ready\n")
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "listener not connected\n")
        if path == "/metrics":
            response = connection.respond(HTTPStatus.OK, "")
            response.body = self.metrics.render()
            del response.headers["Content-Type"]
            del response.headers["Content-Length"]
            response.headers["Content-Type"] = CONTENT_TYPE_LATEST
            response.headers["Content-Length"] = str(len(response.body))
            return response
        # handler_tasks: every accepted socket, handshake finished or not (all_connections counts
        # only finished ones); a set, so len() is O(1).
        if self.server is not None and len(self.server.handler_tasks) > self.max_connections:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections, try again later\n")
        if self.listener.cursor is None:
            # Until the listener has read its first position, a welcome could
            # not say where the client stands.
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "starting, try again\n")
        return None
