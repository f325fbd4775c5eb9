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
import bisect
import contextlib
import json
import logging
import os
import random
import signal
import threading
import time
from collections import deque
from collections.abc import Awaitable, Iterable
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
from realtime.db import OutboxEvent, listen_conninfo, read_events, run_sync
from realtime.handshake import allowed_origins, client_ip
from realtime.limits import HARD_MARGIN, guarded_connection
from realtime.listener import Listener
from realtime.metrics import Metrics
from realtime.presence import PresenceTracker
from realtime.protocol import MAX_TOPICS, CloseCode, State
from realtime.ratelimit import KeyedThrottle, TokenBucket
from realtime.registry import AUDIENCE_SQL, Client, Registry, audience_sql_params, matches
from realtime.topics import allowed_topics, may_subscribe
from realtime.verifier import Verifier

__all__ = ["BACKLOG", "Worker", "connection_limit", "reserved_files", "wait_for_stop_signal"]

logger = logging.getLogger("realtime.server")


# The listen queue, and the most sockets asyncio accepts in one round: about
# three rounds are open before their connections are counted (limits.py).
BACKLOG = 100


def reserved_files() -> int:
    """File descriptors kept for everything but counted clients.

    The worker's own (listener, login pool, up to ``THREADS`` pool connections,
    logs, listening sockets), the sockets reset past the connection limit
    (``HARD_MARGIN``), and about three accept rounds not yet counted.
    """
    return settings.THREADS + 32 + HARD_MARGIN + 3 * BACKLOG


# Replay queries running at once in one worker: reconnecting clients share
# the database fairly, and a flood of deep replays holds at most this many backends.
REPLAY_QUERIES = 4
# A replay batch holds at most about this much event data in memory.
REPLAY_BATCH_BYTES = 1024 * 1024
# Events kept for held clients (see Worker._hold), at most (else they are closed 1013 and resume).
HELD_LOG_BYTES = 64 * 1024 * 1024
# Control events remembered to check logins that were in flight when they arrived.
RECENT_CONTROLS = 1024
SESSION_ENDED = "realtime.session_ended"
USER_CHANGED = "realtime.user_changed"


def connection_limit() -> int:
    """``MAX_CONNECTIONS``, lowered to what this process may open (RLIMIT_NOFILE) less ``reserved_files()``.

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
    return max(1, min(settings.MAX_CONNECTIONS, soft - reserved_files()))


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
        self.listener = Listener(conninfo or listen_conninfo(), self.deliver, settings.BATCH_SIZE)
        self.metrics.listener_up.set_function(lambda: 1 if self.listener.ready else 0)
        self.metrics.connections.set_function(lambda: len(self.registry))
        self._background: set[asyncio.Task[Any]] = set()
        self.presence = PresenceTracker(cursor=lambda: self.listener.cursor)
        self.verifier = Verifier()
        self.max_connections = settings.MAX_CONNECTIONS
        self.server: Any = None
        self.auth_failures = KeyedThrottle(settings.AUTH_FAILURES_PER_MINUTE, settings.AUTH_FAILURES_PER_MINUTE)
        self._replay_slots = asyncio.Semaphore(REPLAY_QUERIES)
        # Clients whose rights are being re-read, and every event routed since the
        # oldest of them was held (None while no client is held): see _hold().
        self._held: dict[Client, None] = {}
        self._held_log: list[OutboxEvent] | None = None
        self._held_log_bytes = 0
        self._recent_controls: deque[tuple[int, str, dict[str, Any]]] = deque(maxlen=RECENT_CONTROLS)

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
                versions = {client: client.rights_version for client in clients if client.state is not State.CLOSED}
                if not versions:
                    continue
                try:
                    identity = await self.verifier.identity_for_session(session_key, user_id)
                except DatabaseError as exc:
                    logger.warning("cannot re-check sessions now, will retry: %s", exc)
                    break
                for client, version in versions.items():
                    if client.state is State.CLOSED:
                        continue
                    if identity is None:
                        self._revoke(client, "access revoked")
                    elif client.held_from is None and client.rights_version == version:
                        # Else a rights change came in meanwhile: its own re-read decides.
                        allowed = await self._allowed_topics(identity, client.topics)
                        if client.held_from is None and client.rights_version == version:
                            self._apply_identity(client, identity, allowed)

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
        # Behind a local proxy that sends no X-Forwarded-For, every client is "unix": not throttled together.
        if remote != "unix" and not self.auth_failures.allowed(remote):
            self.metrics.authentications.labels("throttled").inc()
            logger.info("%s closed 1013: too many failed authentications from this address", remote)
            await ws.close(CloseCode.TRY_AGAIN_LATER, "too many failed authentications, try again later")
            return
        # Control events after this position may have changed what the check below reads.
        checked_after = self.listener.cursor or 0
        try:
            async with asyncio.timeout(settings.AUTH_TIMEOUT):
                identity, reason = await self.verifier.check(auth.token)
        except (DatabaseError, TimeoutError) as exc:
            self.metrics.authentications.labels("unavailable").inc()
            reason = str(exc) or f"no answer in {settings.AUTH_TIMEOUT}s"
            logger.warning("%s closed 1013: cannot verify the token, database unavailable: %s", remote, reason)
            await ws.close(CloseCode.TRY_AGAIN_LATER, "database unavailable, try again")
            return
        if identity is None:
            self.auth_failures.failed(remote)
            self.metrics.authentications.labels("refused").inc()
            logger.info("%s closed 4401: authentication failed (%s)", remote, reason)
            await ws.close(CloseCode.AUTH_FAILED, "authentication failed")
            return
        client = Client(ws, identity, remote)
        allowed_topics = await self._allowed_topics(identity, auth.topics)
        # The per-user cap is checked here, with no await before the registration below:
        # concurrent logins of one user cannot all pass it.
        if len(self.registry.for_user(identity.user_id)) >= settings.MAX_CONNECTIONS_PER_USER:
            self.metrics.authentications.labels("too_many").inc()
            logger.info("%s closed 1013: user %d has too many connections", remote, identity.user_id)
            await ws.close(CloseCode.TRY_AGAIN_LATER, "too many connections for this user")
            return
        self.metrics.authentications.labels("accepted").inc()
        # Register before reading the replay, with no await in between: live events
        # from here on queue in client.pending, the replay covers (last_id, start].
        start = self.listener.cursor or 0
        client.cursor = start
        self.registry.add(client)
        for topic in allowed_topics:
            self.registry.subscribe(client, topic)
        self.presence.joined(client)  # with its topics
        if self._changed_since(checked_after, identity):
            # A logout or rights change committed while the check ran: read again before any live event.
            self._hold(client, start)
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
                client.pending_bytes -= len(message)
                if position > seen_upto:
                    await ws.send(message)
            client.cursor = max(client.cursor, seen_upto)
            client.pending = None
            client.pending_bytes = 0
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
            self._forget(client)
            close_code = ws.close_code if ws.close_code is not None else "-"
            logger.info("%s user %d disconnected (%s)", remote, identity.user_id, close_code)

    async def _resume(self, client: Client, last_id: int, start: int) -> int:
        """Send what ``client`` missed after ``last_id``, or ``reset`` if that cannot be known.

        PostgreSQL picks the client's events (``AUDIENCE_SQL``); at most
        ``REPLAY_QUERIES`` replay queries run at once, and each batch holds at
        most about ``REPLAY_BATCH_BYTES`` of event data. ``send()`` waits while
        the client's socket buffer is full, so a client that does not read
        holds one batch until keepalive closes it.

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
                audience = (AUDIENCE_SQL, audience_sql_params(client.identity, client.topics))
                async with self._replay_slots:
                    events = await run_sync(
                        read_events, after, start, settings.BATCH_SIZE, audience=audience, max_bytes=REPLAY_BATCH_BYTES
                    )
                if not events:
                    break
                after = events[-1].position
                for event in events:
                    await client.ws.send(event.message)
                del events  # not held while waiting for the next batch
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
            topic = parsed.topic
            if topic not in client.topics and len(client.topics) >= MAX_TOPICS:
                refusal = f"A connection may hold at most {MAX_TOPICS} topics; unsubscribe from one first."
                await ws.send(protocol.encode_error("too_many_topics", refusal, topic=topic))
            elif await may_subscribe(client.identity, topic):
                if client.state is not State.CLOSED:
                    self.registry.subscribe(client, topic)
                    self.presence.subscribed(client, topic)
                await ws.send(protocol.encode_subscribed(topic, True))
            else:
                refusal = f"You may not subscribe to topic {topic!r}."
                await ws.send(protocol.encode_error("forbidden", refusal, topic=topic))
        elif isinstance(parsed, protocol.Unsubscribe):
            self._unsubscribe(client, parsed.topic)
            await ws.send(protocol.encode_subscribed(parsed.topic, False))

    def _unsubscribe(self, client: Client, topic: str) -> None:
        self.registry.unsubscribe(client, topic)
        self.presence.unsubscribed(client, topic)

    def _forget(self, client: Client) -> None:
        """Stop routing to ``client`` at once and drop it from presence; safe to call twice."""
        client.state = State.CLOSED
        self.registry.remove(client)
        self.presence.left(client)
        if client.held_from is not None:
            self._release(client)

    # Routing, called by the listener in commit order.

    def deliver(self, events: list[OutboxEvent]) -> None:
        """Route each committed event to its connected recipients.

        One pass over the recipients per event, then ``broadcast()`` of the
        message encoded once. The cost that remains is a ``send()`` system
        call per recipient. A control event takes effect before the next
        event is routed: a revoked client receives nothing committed after it.
        """
        now = time.time()
        routed = frames = 0
        max_pending, max_buffer = settings.MAX_PENDING, settings.MAX_BUFFER
        for event in events:
            if event.control is not None:
                self._control(event)
                continue
            if self._held_log is not None:
                self._held_log.append(event)
                self._held_log_bytes += len(event.message or "")
                if len(self._held_log) > max_pending or self._held_log_bytes > HELD_LOG_BYTES:
                    self._drop_held("too many events while its rights were re-read")
            recipients = self.registry.recipients(event.audience)
            if not recipients:
                continue
            position, message = event.position, event.message
            live, overflowing = [], []
            for client in recipients:
                if client.cursor >= position or client.held_from is not None:
                    continue  # already has it, or its re-read rights decide (_release)
                client.cursor = position
                pending = client.pending
                if pending is None:
                    live.append(client)
                elif len(pending) < max_pending and client.pending_bytes < max_buffer:
                    pending.append((position, message))
                    client.pending_bytes += len(message)
                else:
                    overflowing.append(client)
            if live:
                broadcast([client.ws for client in live], message)
                # A transport pauses its protocol past websockets' write limit (32 KiB):
                # only those clients can be over MAX_BUFFER.
                for client in live:
                    if client.ws.paused:
                        self._check_buffer(client)
            for client in overflowing:
                self._drop_slow(client, "too many events queued during replay")
            routed += 1
            frames += len(live)
            self.metrics.lag.observe(max(0.0, now - event.created))
        # Counted once per batch: a counter's lock costs as much as routing a small event.
        self.metrics.events.inc(routed)
        self.metrics.frames.inc(frames)

    def _check_buffer(self, client: Client) -> None:
        transport = client.ws.transport
        if transport is not None and transport.get_write_buffer_size() > settings.MAX_BUFFER:
            self._drop_slow(client, "not reading fast enough")

    def _drop_slow(self, client: Client, reason: str) -> None:
        """Close a client that cannot keep up with 1013; nobody else waits for it."""
        logger.warning("%s user %d closed 1013: %s", client.remote, client.identity.user_id, reason)
        self.metrics.slow_closed.inc()
        # The frame in hand, and whatever was queued for the client, will not be sent.
        self.metrics.dropped.inc(1 + len(client.pending or ()))
        self._forget(client)
        self._spawn(client.ws.close(CloseCode.TRY_AGAIN_LATER, "too slow"))

    # Control events: logouts and rights changes, applied before the next event.

    def _control(self, event: OutboxEvent) -> None:
        try:
            data = json.loads(event.control_data or "{}")
        except ValueError:
            logger.error("control event %d has invalid data; ignored", event.position)
            return
        self._recent_controls.append((event.position, event.control or "", data))
        if event.control == SESSION_ENDED:
            for client in self.registry.for_session(data.get("session", "")):
                self._revoke(client, "session ended")
        elif event.control == USER_CHANGED:
            clients: set[Client] = set()
            for user_id in data.get("users", ()):
                clients |= self.registry.for_user(user_id)
            for group in data.get("groups", ()):
                clients |= self.registry.for_group(group)
            for client in clients:
                self._hold(client, event.position)

    def _changed_since(self, position: int, identity: tokens.Identity) -> bool:
        """Return True if a control event after ``position`` may concern ``identity`` (or cannot be known)."""
        recent = self._recent_controls
        for control_position, control, data in reversed(recent):
            if control_position <= position:
                return False
            if control == SESSION_ENDED and data.get("session") == identity.session_hash:
                return True
            if control == USER_CHANGED and (
                identity.user_id in data.get("users", ()) or not identity.groups.isdisjoint(data.get("groups", ()))
            ):
                return True
        # Every remembered control is newer: older ones may have been forgotten.
        return len(recent) == recent.maxlen

    def _revoke(self, client: Client, reason: str) -> None:
        """Close ``client`` with 4401; it receives nothing from now on."""
        if client.state is State.CLOSED:
            return
        logger.info("%s user %d: %s, closing 4401", client.remote, client.identity.user_id, reason)
        self._forget(client)
        self._spawn(client.ws.close(CloseCode.AUTH_FAILED, reason))

    def _hold(self, client: Client, position: int) -> None:
        """Re-read ``client``'s rights; meanwhile, events after ``position`` wait for the answer.

        Nothing committed after a rights change reaches the client under its
        old rights: ``deliver()`` skips a held client, and ``_release()`` sends
        it what it missed under its new ones, in order.
        """
        if client.state is State.CLOSED:
            return
        client.rights_version += 1
        if client.held_from is not None:
            return  # the re-read in progress sees the new version and reads again
        client.held_from = position
        self._held[client] = None
        if self._held_log is None:
            self._held_log = []
        self._spawn(self._reread_rights(client))

    async def _reread_rights(self, client: Client) -> None:
        old = client.identity
        try:
            async with asyncio.timeout(settings.AUTH_TIMEOUT):
                while True:
                    version = client.rights_version
                    identity = await self.verifier.identity_for_session(old.session_key, old.user_id)
                    allowed = await self._allowed_topics(identity, client.topics) if identity is not None else []
                    if client.rights_version == version or client.state is State.CLOSED:
                        break
        except (DatabaseError, TimeoutError) as exc:
            if client.state is not State.CLOSED:
                logger.warning("%s user %d closed 1013: cannot re-check rights: %s", client.remote, old.user_id, exc)
                self._forget(client)
                self._spawn(client.ws.close(CloseCode.TRY_AGAIN_LATER, "cannot re-check rights, try again"))
            return
        if client.state is State.CLOSED:
            return
        if identity is None:
            self._revoke(client, "access revoked")
            return
        self._apply_identity(client, identity, allowed)
        self._release(client)

    async def _allowed_topics(self, identity: tokens.Identity, topics: Iterable[str]) -> list[str]:
        return await allowed_topics(identity, topics)

    def _apply_identity(self, client: Client, identity: tokens.Identity, allowed_topics: list[str]) -> None:
        """Give ``client`` its re-read rights; it keeps only ``allowed_topics`` of its topics."""
        self.registry.update_identity(client, identity)
        for topic in client.topics.difference(allowed_topics):
            self._unsubscribe(client, topic)

    def _release(self, client: Client) -> None:
        """End ``client``'s hold: send it, by its current rights, what was routed meanwhile."""
        held_from, client.held_from = client.held_from, None
        self._held.pop(client, None)
        log = self._held_log or []
        if not self._held:
            self._held_log, self._held_log_bytes = None, 0
        if client.state is State.CLOSED or held_from is None:
            return
        start = bisect.bisect_right(log, max(held_from, client.cursor), key=lambda event: event.position)
        missed = [e for e in log[start:] if matches(client.identity, client.topics, e.audience)]
        if not missed:
            return
        client.cursor = missed[-1].position
        if client.pending is not None:  # still replaying: these follow the replay
            client.pending.extend((event.position, event.message) for event in missed)
            client.pending_bytes += sum(len(event.message) for event in missed)
            return
        for event in missed:
            broadcast([client.ws], event.message)
        self._check_buffer(client)

    def _drop_held(self, reason: str) -> None:
        """Close every held client with 1013 (they resume on reconnection) and forget the log."""
        for client in list(self._held):
            self._drop_slow(client, reason)
        self._held.clear()
        self._held_log, self._held_log_bytes = None, 0

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
