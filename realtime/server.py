"""The websocket worker: serve(), the connection handler, HTTP routes, shutdown.

One :class:`Worker` per process. It runs a :class:`~realtime.listener.Listener`
and a websockets server on one port:

- ``GET /healthz`` 200 while the process serves; ``GET /readyz`` 200 while
  the listener is connected, else 503; ``GET /metrics`` Prometheus text;
- any other path upgrades to a websocket. The first message must
  authenticate within ``AUTH_TIMEOUT`` (else 4408); a bad token closes 4401.
  Then: ``welcome``, the replay of what the client missed (``last_id``), and
  live events, each exactly once and in commit order.

Logins and session re-checks go through :class:`~realtime.verifier.Verifier`
(psycopg async); every other ORM call runs in the thread pool
(``realtime.db.run_sync``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import Any

from django.db import DatabaseError
from prometheus_client import CONTENT_TYPE_LATEST
from websockets.asyncio.server import ServerConnection, broadcast, serve, unix_serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from realtime import protocol, retention, tokens
from realtime.conf import settings
from realtime.db import OutboxEvent, listener_conninfo, read_events, run_sync
from realtime.handshake import allowed_origins, client_ip
from realtime.listener import Listener
from realtime.metrics import Metrics
from realtime.presence import PresenceTracker
from realtime.protocol import CloseCode, State
from realtime.ratelimit import TokenBucket
from realtime.registry import Client, Registry, matches
from realtime.topics import may_subscribe
from realtime.verifier import Verifier

__all__ = ["RESERVED_FILES", "Worker", "connection_limit", "wait_for_stop_signal"]

logger = logging.getLogger("realtime.server")


# File descriptors kept for everything but clients: database connections (listener,
# logins, the thread pool), logs, the listening sockets.
RESERVED_FILES = 128


def connection_limit() -> int:
    """``MAX_CONNECTIONS``, lowered to what this process may open (RLIMIT_NOFILE) less ``RESERVED_FILES``.

    Past its open-files limit a process can neither accept nor reach the
    database: better answer 503 to the next client than fail everyone.
    """
    try:
        import resource
    except ImportError:  # not on Windows
        return settings.MAX_CONNECTIONS
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return settings.MAX_CONNECTIONS
    return max(1, min(settings.MAX_CONNECTIONS, soft - RESERVED_FILES))


def wait_for_stop_signal() -> asyncio.Future[None]:
    """Return a future that completes on the first SIGINT or SIGTERM (call inside the loop)."""
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    if threading.current_thread() is not threading.main_thread():
        # Under the autoreloader (--reload) the main thread owns the signals and ends the process.
        return stop
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
    return stop


class Worker:
    """One websocket worker process: listener, registry and server."""

    def __init__(self, *, conninfo: str | None = None, name: str = "worker") -> None:
        self.name = name
        self.registry = Registry()
        self.metrics = Metrics()
        self.listener = Listener(conninfo or listener_conninfo(), self.deliver, settings.BATCH_SIZE)
        self.metrics.listener_up.set_function(lambda: 1 if self.listener.ready else 0)
        self.metrics.connections.set_function(lambda: len(self.registry))
        self._background: set[asyncio.Task[Any]] = set()
        self.presence = PresenceTracker(cursor=lambda: self.listener.cursor)
        self.verifier = Verifier()
        self.max_connections = settings.MAX_CONNECTIONS
        self.server: Any = None

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
        # The default executor has min(32, cpus + 4) threads: too few for a burst of logins.
        loop.set_default_executor(ThreadPoolExecutor(settings.THREADS, thread_name_prefix="realtime-db"))
        await self.verifier.open()
        self.max_connections = connection_limit()
        if self.max_connections < settings.MAX_CONNECTIONS:
            logger.warning(
                "MAX_CONNECTIONS is %d, but this process may open only %d files: serving at most %d connections "
                "(raise the open-files limit: LimitNOFILE= in systemd, ulimit -n in a shell)",
                settings.MAX_CONNECTIONS,
                self.max_connections + RESERVED_FILES,
                self.max_connections,
            )
        tasks = [
            asyncio.create_task(self.listener.run(), name="realtime-listener"),
            asyncio.create_task(self._prune_forever(), name="realtime-pruner"),
            asyncio.create_task(self._revalidate_forever(), name="realtime-revalidate"),
            asyncio.create_task(self.presence.run(), name="realtime-presence"),
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
                    address = unix_path or _format_address(sock.getsockname())
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

    async def _revalidate_forever(self) -> None:
        """Re-check every open session now and then (catches any session deletion)."""
        while True:
            await asyncio.sleep(settings.REVALIDATE_INTERVAL * random.uniform(0.9, 1.1))
            sessions: dict[tuple[str, int], list[Client]] = {}
            for client in self.registry.clients:
                key = (client.identity.session_key, client.identity.user_id)
                sessions.setdefault(key, []).append(client)
            # One session at a time (not one connection): background hygiene, not a burst.
            for (session_key, user_id), clients in sessions.items():
                clients = [client for client in clients if client.state is not State.CLOSED]
                if not clients:
                    continue
                try:
                    identity = await self.verifier.identity_for_session(session_key, user_id)
                except DatabaseError as exc:
                    logger.warning("cannot re-check sessions now, will retry: %s", exc)
                    break
                for client in clients:
                    await self._apply_identity(client, identity)

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
        # all_connections: O(1), and counts handshakes in progress too (``connections`` is a set built per call).
        if self.server is not None and len(self.server.all_connections) >= self.max_connections:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections, try again later\n")
        if self.listener.cursor is None:
            # Until the listener has read its first position, a welcome could
            # not say where the client stands.
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "starting, try again\n")
        return None

    # The websocket handler.

    async def handler(self, ws: ServerConnection) -> None:
        peer = ws.remote_address[0] if isinstance(ws.remote_address, tuple) else ""
        remote = client_ip(peer, ws.request.headers.get("X-Forwarded-For") if ws.request else None)
        # websockets keeps the handshake for the connection's lifetime; its headers (cookies
        # included: often kilobytes per connection) are not needed past this line.
        for handshake in (ws.request, ws.response):
            if handshake is not None:
                handshake.headers.clear()
        try:
            first = await asyncio.wait_for(ws.recv(), settings.AUTH_TIMEOUT)
        except TimeoutError:
            self.metrics.authentications.labels("timeout").inc()
            logger.info("%s closed 4408: no authentication in %ss", remote, settings.AUTH_TIMEOUT)
            await ws.close(CloseCode.AUTH_TIMEOUT, "authentication timeout")
            return
        except ConnectionClosed:
            return
        try:
            auth = protocol.parse_auth(first)
        except protocol.ProtocolError as exc:
            self.metrics.authentications.labels("bad_message").inc()
            logger.info("%s closed %d: %s", remote, exc.close_code, exc.message)
            await ws.close(exc.close_code or CloseCode.POLICY_VIOLATION, exc.message)
            return
        try:
            identity, reason = await self.verifier.check(auth.token)
        except DatabaseError as exc:
            self.metrics.authentications.labels("unavailable").inc()
            logger.warning("%s closed 1013: cannot verify the token, database unavailable: %s", remote, exc)
            await ws.close(CloseCode.TRY_AGAIN_LATER, "database unavailable, try again")
            return
        if identity is None:
            self.metrics.authentications.labels("refused").inc()
            logger.info("%s closed 4401: authentication failed (%s)", remote, reason)
            await ws.close(CloseCode.AUTH_FAILED, "authentication failed")
            return
        if len(self.registry.for_user(identity.user_id)) >= settings.MAX_CONNECTIONS_PER_USER:
            self.metrics.authentications.labels("too_many").inc()
            logger.info("%s closed 1013: user %d has too many connections", remote, identity.user_id)
            await ws.close(CloseCode.TRY_AGAIN_LATER, "too many connections for this user")
            return
        self.metrics.authentications.labels("accepted").inc()
        client = Client(ws, identity, remote)
        allowed_topics = [topic for topic in auth.topics if await may_subscribe(identity, topic)]
        # Register before reading the replay, with no await in between: live events
        # from here on queue in client.pending, the replay covers (last_id, start].
        start = self.listener.cursor or 0
        client.cursor = start
        self.registry.add(client)
        for topic in allowed_topics:
            self.registry.subscribe(client, topic)
        self.presence.joined(client)  # with its topics
        logger.info("%s authenticated as user %d (%s)", remote, identity.user_id, identity.username)
        try:
            await ws.send(protocol.encode_welcome(identity.user_id, identity.username, start))
            for topic in auth.topics:
                await ws.send(protocol.encode_subscribed(topic, topic in client.topics))
            seen_upto = 0
            if auth.last_id is not None and auth.last_id != start:
                try:
                    seen_upto = await self._resume(client, auth.last_id, start)
                except DatabaseError as exc:
                    logger.warning("%s closed 1013: replay failed, database unavailable: %s", remote, exc)
                    await ws.close(CloseCode.TRY_AGAIN_LATER, "database unavailable, try again")
                    return
            while client.pending:
                position, message = client.pending.popleft()
                if position > seen_upto:
                    await ws.send(message)
            client.cursor = max(client.cursor, seen_upto)
            client.pending = None
            client.state = State.LIVE
            # This coroutine lives as long as the connection: keep only what the loop needs.
            del first, auth, allowed_topics
            bucket = TokenBucket(settings.MESSAGE_BURST, settings.MESSAGES_PER_MINUTE)
            async for message in ws:
                if not bucket.allow():
                    logger.info("%s user %d closed 1008: too many messages", remote, identity.user_id)
                    await ws.close(CloseCode.POLICY_VIOLATION, "too many messages")
                    break
                await self._on_message(client, message)
        except ConnectionClosed:
            pass
        finally:
            client.state = State.CLOSED
            self.registry.remove(client)
            self.presence.left(client)
            close_code = ws.close_code if ws.close_code is not None else "-"
            logger.info("%s user %d disconnected (%s)", remote, identity.user_id, close_code)

    async def _resume(self, client: Client, last_id: int, start: int) -> int:
        """Send what ``client`` missed after ``last_id``, or ``reset`` if that cannot be known.

        Returns the position up to which the client already has every event
        (its ``last_id`` when it is ahead of this worker), else 0.
        """
        if last_id < start:
            if last_id < await run_sync(retention.horizon):
                # Events after last_id may have been pruned: replay cannot be exact.
                await self._reset(client, start, "cursor older than retention")
                return 0
            after = last_id
            while after < start:
                events = await run_sync(read_events, after, start, settings.BATCH_SIZE)
                if not events:
                    break
                for event in events:
                    if matches(client.identity, client.topics, event.audience):
                        await client.ws.send(event.message)
                after = events[-1].position
            return 0
        if last_id > await run_sync(_newest_known_position):
            # A cursor from the future (e.g. another database): start afresh.
            await self._reset(client, start, "cursor unknown to this database")
            return 0
        return last_id  # ahead of this worker: another worker sent up to last_id

    async def _reset(self, client: Client, start: int, reason: str) -> None:
        logger.info("%s user %d: reset (%s)", client.remote, client.identity.user_id, reason)
        # Live events after ``start`` are queued in client.pending and follow.
        await client.ws.send(protocol.encode_reset(start))

    async def _on_message(self, client: Client, message: str | bytes) -> None:
        ws = client.ws
        try:
            parsed = protocol.parse_message(message)
        except protocol.ProtocolError as exc:
            if exc.close_code is not None:
                await ws.close(exc.close_code, exc.message)
            else:
                await ws.send(protocol.encode_error(exc.code, exc.message))
            return
        if isinstance(parsed, protocol.Ping):
            await ws.send(protocol.encode_pong())
        elif isinstance(parsed, protocol.Subscribe):
            if await may_subscribe(client.identity, parsed.topic):
                self.registry.subscribe(client, parsed.topic)
                self.presence.subscribed(client, parsed.topic)
                await ws.send(protocol.encode_subscribed(parsed.topic, True))
            else:
                refusal = f"You may not subscribe to topic {parsed.topic!r}."
                await ws.send(protocol.encode_error("forbidden", refusal, topic=parsed.topic))
        elif isinstance(parsed, protocol.Unsubscribe):
            self.registry.unsubscribe(client, parsed.topic)
            self.presence.unsubscribed(client, parsed.topic)
            await ws.send(protocol.encode_subscribed(parsed.topic, False))

    # Routing, called by the listener in commit order.

    def deliver(self, events: list[OutboxEvent]) -> None:
        """Route each committed event to its connected recipients.

        One pass over the recipients per event, then ``broadcast()`` of the
        message encoded once. The cost that remains is a ``send()`` system
        call per recipient.
        """
        now = time.time()
        routed = frames = 0
        max_pending = settings.MAX_PENDING
        for event in events:
            if event.control is not None:
                self._control(event)
                continue
            recipients = self.registry.recipients(event.audience)
            if not recipients:
                continue
            position, message = event.position, event.message
            live, overflowing = [], []
            for client in recipients:
                if client.cursor >= position:
                    continue  # the replay or another path already has it
                client.cursor = position
                pending = client.pending
                if pending is None:
                    live.append(client)
                elif len(pending) < max_pending:
                    pending.append((position, message))
                else:
                    overflowing.append(client)
            if live:
                broadcast([client.ws for client in live], message)
                # A transport pauses its protocol past websockets' write limit (32 KiB):
                # only those clients can be over MAX_BUFFER.
                slow = [client for client in live if client.ws.paused]
                for client in slow:
                    transport = client.ws.transport
                    if transport is not None and transport.get_write_buffer_size() > settings.MAX_BUFFER:
                        self._drop_slow(client, "not reading fast enough")
            for client in overflowing:
                self._drop_slow(client, "too many events queued during replay")
            routed += 1
            frames += len(live)
            self.metrics.lag.observe(max(0.0, now - event.created))
        # Counted once per batch: a counter's lock costs as much as routing a small event.
        self.metrics.events.inc(routed)
        self.metrics.frames.inc(frames)

    def _drop_slow(self, client: Client, reason: str) -> None:
        """Close a client that cannot keep up with 1013; nobody else waits for it."""
        logger.warning("%s user %d closed 1013: %s", client.remote, client.identity.user_id, reason)
        self.metrics.slow_closed.inc()
        # The frame in hand, and whatever was queued for the client, will not be sent.
        self.metrics.dropped.inc(1 + len(client.pending or ()))
        client.state = State.CLOSED
        self.registry.remove(client)
        self._spawn(client.ws.close(CloseCode.TRY_AGAIN_LATER, "too slow"))

    def _control(self, event: OutboxEvent) -> None:
        data = json.loads(event.control_data or "{}")
        if event.control == "realtime.session_ended":
            for client in self.registry.for_session(data.get("session", "")):
                logger.info("%s user %d: session ended, closing 4401", client.remote, client.identity.user_id)
                self._spawn(client.ws.close(CloseCode.AUTH_FAILED, "session ended"))
        elif event.control == "realtime.user_changed":
            clients: set[Client] = set()
            for user_id in data.get("users", ()):
                clients |= self.registry.for_user(user_id)
            for group in data.get("groups", ()):
                clients |= self.registry.for_group(group)
            for client in clients:
                self._spawn(self._refresh(client))

    async def _refresh(self, client: Client) -> None:
        """Re-read ``client``'s rights; close it with 4401 if its session is no longer valid."""
        old = client.identity
        try:
            identity = await self.verifier.identity_for_session(old.session_key, old.user_id)
        except DatabaseError as exc:
            logger.warning("cannot re-check user %d now, keeping their rights: %s", old.user_id, exc)
            return
        await self._apply_identity(client, identity)

    async def _apply_identity(self, client: Client, identity: tokens.Identity | None) -> None:
        """Give ``client`` its re-read rights, or close it with 4401 when there are none."""
        if client.state is State.CLOSED:
            return
        if identity is None:
            logger.info("%s user %d: access revoked, closing 4401", client.remote, client.identity.user_id)
            await client.ws.close(CloseCode.AUTH_FAILED, "access revoked")
            return
        self.registry.update_identity(client, identity)
        for topic in list(client.topics):
            if not await may_subscribe(identity, topic):
                self.registry.unsubscribe(client, topic)
                self.presence.unsubscribed(client, topic)

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _newest_known_position() -> int:
    return max(retention.newest_position(), retention.horizon())


def _format_address(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address or "unix")
