"""One client connection, from its first message to its close: authentication, replay, client messages.

The first message must authenticate within ``AUTH_TIMEOUT`` (else 4408); a
bad token closes 4401. Then: ``welcome``, the replay of what the client missed
(``last_id``), and live events, each exactly once and in commit order, while
the client may subscribe, unsubscribe and ping.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from django.db import DEFAULT_DB_ALIAS, DatabaseError
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from realtime import retention, tokens
from realtime.conf import settings
from realtime.core import protocol
from realtime.core.audience import AUDIENCE_SQL, audience_sql_params
from realtime.core.protocol import MAX_TOPICS, CloseCode
from realtime.core.ratelimit import KeyedThrottle, TokenBucket
from realtime.outbox import read_events
from realtime.worker.control import Control
from realtime.worker.db import read_alias, run_sync
from realtime.worker.fanout import Fanout
from realtime.worker.handshake import client_ip, throttle_key
from realtime.worker.listener import LAG_BACKOFF_MAX, LAG_BACKOFF_MIN, Listener
from realtime.worker.metrics import Metrics
from realtime.worker.registry import Client, Registry, State
from realtime.worker.subscriptions import allowed_topics
from realtime.worker.verifier import Verifier

__all__ = ["REPLAY_BATCH_BYTES", "REPLAY_QUERIES", "ConnectionHandler", "ReplicaBehind"]

logger = logging.getLogger("realtime.server")

# Replay queries running at once in one worker: reconnecting clients share the
# database fairly, and a flood of deep replays holds at most this many backends.
REPLAY_QUERIES = 4
# A replay batch holds at most about this much event data in memory.
REPLAY_BATCH_BYTES = 1024 * 1024


class ReplicaBehind(Exception):
    """The read replica has not reached the replay's end within ``AUTH_TIMEOUT``: the client should retry."""


class ConnectionHandler:
    """The websocket handler of a worker: ``await handler(ws)`` serves one connection until it closes."""

    def __init__(
        self,
        *,
        registry: Registry,
        listener: Listener,
        verifier: Verifier,
        fanout: Fanout,
        control: Control,
        metrics: Metrics,
    ) -> None:
        self.registry = registry
        self.listener = listener
        self.verifier = verifier
        self.fanout = fanout
        self.control = control
        self.metrics = metrics
        self.auth_failures = KeyedThrottle(settings.AUTH_FAILURES_PER_MINUTE, settings.AUTH_FAILURES_PER_MINUTE)
        self.replay_slots = asyncio.Semaphore(REPLAY_QUERIES)

    async def __call__(self, ws: ServerConnection) -> None:
        peer = ws.remote_address[0] if isinstance(ws.remote_address, tuple) else ""
        # Several X-Forwarded-For headers read as one list, as proxies join them.
        forwarded = ", ".join(ws.request.headers.get_all("X-Forwarded-For")) if ws.request else ""
        remote = client_ip(peer, forwarded or None)
        # websockets keeps the handshake for the connection's lifetime; its headers (cookies
        # included: often kilobytes per connection) are not needed past this line.
        for handshake in (ws.request, ws.response):
            if handshake is not None:
                handshake.headers.clear()
        authenticated = await self._authenticate(ws, remote)
        if authenticated is None:
            return
        client, auth = authenticated
        del authenticated
        try:
            await self._serve(client, auth)
        except ConnectionClosed:
            pass
        finally:
            self.fanout.forget(client)
            close_code = ws.close_code if ws.close_code is not None else "-"
            logger.info("%s user %d disconnected (%s)", remote, client.identity.user_id, close_code)

    async def _authenticate(self, ws: ServerConnection, remote: str) -> tuple[Client, protocol.Auth] | None:
        """Read and check the first message; register the client and return it, or close and return None."""
        try:
            first = await asyncio.wait_for(ws.recv(), settings.AUTH_TIMEOUT)
        except TimeoutError:
            self.metrics.authentications.labels("timeout").inc()
            logger.info("%s closed 4408: no authentication in %ss", remote, settings.AUTH_TIMEOUT)
            await ws.close(CloseCode.AUTH_TIMEOUT, "authentication timeout")
            return None
        except ConnectionClosed:
            return None
        try:
            auth = protocol.parse_auth(first)
        except protocol.ProtocolError as exc:
            self.metrics.authentications.labels("bad_message").inc()
            logger.info("%s closed %d: %s", remote, exc.close_code, exc.message)
            await ws.close(exc.close_code or CloseCode.POLICY_VIOLATION, exc.message)
            return None
        throttled = throttle_key(remote)
        if throttled is not None and not self.auth_failures.allowed(throttled):
            self.metrics.authentications.labels("throttled").inc()
            logger.info("%s closed 1013: too many failed authentications from this address", remote)
            await ws.close(CloseCode.TRY_AGAIN_LATER, "too many failed authentications, try again later")
            return None
        # Control events after this position may have changed what the check below reads.
        checked_after = self.listener.cursor or 0
        try:
            async with asyncio.timeout(settings.AUTH_TIMEOUT):
                identity, refusal = await self.verifier.check(auth.token)
        except (DatabaseError, TimeoutError) as exc:
            self.metrics.authentications.labels("unavailable").inc()
            reason = str(exc) or f"no answer in {settings.AUTH_TIMEOUT}s"
            logger.warning("%s closed 1013: cannot verify the token, database unavailable: %s", remote, reason)
            await ws.close(CloseCode.TRY_AGAIN_LATER, "database unavailable, try again")
            return None
        if identity is None:
            if throttled is not None and refusal not in tokens.FREE_REFUSALS:
                # Only refusals that cost a query count: junk tokens cannot lock out an address's neighbours.
                self.auth_failures.failed(throttled)
            self.metrics.authentications.labels("refused").inc()
            logger.info("%s closed 4401: authentication failed (%s)", remote, refusal)
            await ws.close(CloseCode.AUTH_FAILED, "authentication failed")
            return None
        client = Client(ws, identity, remote)
        topics = await allowed_topics(identity, auth.topics)
        # The per-user cap is checked here, with no await before the registration below:
        # concurrent logins of one user cannot all pass it.
        if len(self.registry.for_user(identity.user_id)) >= settings.MAX_CONNECTIONS_PER_USER:
            self.metrics.authentications.labels("too_many").inc()
            logger.info("%s closed 1013: user %d has too many connections", remote, identity.user_id)
            await ws.close(CloseCode.TRY_AGAIN_LATER, "too many connections for this user")
            return None
        self.metrics.authentications.labels("accepted").inc()
        # Registered before the replay is read, with no await in between: live events
        # from here on queue in client.pending, the replay covers (last_id, start].
        start = self.listener.cursor or 0
        client.cursor = start
        self.registry.add(client, topics)
        if self.control.changed_since(checked_after, identity):
            # A logout or rights change committed while the check ran: read again before any event.
            self.control.hold(client, start)
        logger.info("%s authenticated as user %d (%s)", remote, identity.user_id, identity.username)
        return client, auth

    async def _serve(self, client: Client, auth: protocol.Auth) -> None:
        ws = client.ws
        identity = client.identity
        start = client.cursor
        await ws.send(protocol.encode_welcome(identity.user_id, identity.username, start))
        for topic in auth.topics:
            await ws.send(protocol.encode_subscribed(topic, topic in client.topics))
        seen_upto = 0
        if auth.last_id is not None and auth.last_id != start:
            # A rights change in flight decides first: the replay uses the re-read rights.
            await self.control.released(client)
            if client.state is State.CLOSED:
                return
            try:
                seen_upto = await self._resume(client, auth.last_id, start)
            except (DatabaseError, TimeoutError) as exc:
                logger.warning("%s closed 1013: replay failed, database unavailable: %s", client.remote, exc)
                await ws.close(CloseCode.TRY_AGAIN_LATER, "database unavailable, try again")
                return
            except ReplicaBehind as exc:
                # Nothing after what was sent is lost: the client resumes from its last id.
                logger.warning("%s closed 1013: %s", client.remote, exc)
                await ws.close(CloseCode.TRY_AGAIN_LATER, "database replica behind, try again later")
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
        del auth  # this coroutine lives as long as the connection: keep only what it needs
        bucket = TokenBucket(settings.MESSAGE_BURST, settings.MESSAGES_PER_MINUTE)
        async for received in ws:
            if not bucket.allow():
                logger.info("%s user %d closed 1008: too many messages", client.remote, identity.user_id)
                await ws.close(CloseCode.POLICY_VIOLATION, "too many messages")
                break
            await self._on_message(client, received)

    async def _resume(self, client: Client, last_id: int, start: int) -> int:
        """Send what ``client`` missed after ``last_id``, or ``reset`` if that cannot be known.

        PostgreSQL picks the client's events (``AUDIENCE_SQL``); every query
        of a replay, the horizon's included, takes one of ``REPLAY_QUERIES``
        slots, and each batch holds at most about ``REPLAY_BATCH_BYTES`` of event
        data. ``send()`` waits while the client's socket buffer is full, so a
        client that does not read holds one batch until keepalive closes it.

        The replay reads ``READ_DATABASE`` when set. A replica may not have
        reached ``start`` (the worker's cursor) yet: the replay first waits
        until it has, so that a short read means "no more events" and never
        "not replayed yet", and the horizon it checks is the one at ``start``.

        Returns the position up to which the client already has every event
        (its ``last_id`` when it is ahead of this worker), else 0.

        Raises:
            ReplicaBehind: if the replica has not reached ``start`` within
                ``AUTH_TIMEOUT`` seconds (nothing was sent).
        """
        using = read_alias()
        if last_id > start:
            newest = await self._query(retention.reached_position, using)
            if last_id > newest and using != DEFAULT_DB_ALIAS:
                # A lagging replica is no proof: ask the primary.
                newest = await self._query(retention.reached_position, DEFAULT_DB_ALIAS)
            if last_id > newest:
                # A cursor from the future (e.g. another database): start afresh.
                await self._reset(client, start, "cursor unknown to this database")
                return 0
            return last_id  # ahead of this worker: another worker sent up to last_id
        if using != DEFAULT_DB_ALIAS:
            await self._wait_for_replica(using, start)
        if last_id < await self._query(retention.horizon, using):
            # Events after last_id may have been pruned: replay cannot be exact.
            await self._reset(client, start, "cursor older than retention")
            return 0
        after = last_id
        while after < start:
            audience = (AUDIENCE_SQL, audience_sql_params(client.identity, client.topics))
            events = await self._query(
                read_events,
                after,
                start,
                settings.BATCH_SIZE,
                audience=audience,
                max_bytes=REPLAY_BATCH_BYTES,
                using=using,
            )
            if not events:
                break
            after = events[-1].position
            for event in events:
                await client.ws.send(event.message)
            del events  # not held while waiting for the next batch
        return 0

    async def _wait_for_replica(self, using: str, start: int) -> None:
        """Return once the replica ``using`` has reached ``start``; raise ReplicaBehind after ``AUTH_TIMEOUT``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.AUTH_TIMEOUT
        delay = LAG_BACKOFF_MIN
        while True:
            reached = await self._query(retention.reached_position, using)
            if reached >= start:
                return
            if loop.time() + delay > deadline:
                raise ReplicaBehind(
                    f"the read replica is at position {reached}, the replay ends at {start}: "
                    f"not reached in {settings.AUTH_TIMEOUT}s"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, LAG_BACKOFF_MAX)

    async def _query(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a replay query in the thread pool, in one of the replay slots, within ``AUTH_TIMEOUT``."""
        async with self.replay_slots, asyncio.timeout(settings.AUTH_TIMEOUT):
            return await run_sync(fn, *args, **kwargs)

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
            await self._subscribe(client, parsed.topic)
        elif isinstance(parsed, protocol.Unsubscribe):
            self.registry.unsubscribe(client, parsed.topic)
            await ws.send(protocol.encode_subscribed(parsed.topic, False))

    async def _subscribe(self, client: Client, topic: str) -> None:
        ws = client.ws
        if topic not in client.topics and len(client.topics) >= MAX_TOPICS:
            refusal = f"A connection may hold at most {MAX_TOPICS} topics; unsubscribe from one first."
            await ws.send(protocol.encode_error("too_many_topics", refusal, topic=topic))
            return
        while True:
            # Decided by the rights the client has when the answer comes: a change meanwhile asks again.
            await self.control.released(client)
            version = client.rights_version
            allowed = bool(await allowed_topics(client.identity, [topic]))
            if client.rights_version == version or client.state is State.CLOSED:
                break
        if not allowed:
            refusal = f"You may not subscribe to topic {topic!r}."
            await ws.send(protocol.encode_error("forbidden", refusal, topic=topic))
            return
        if client.state is not State.CLOSED:
            self.registry.subscribe(client, topic)
        await ws.send(protocol.encode_subscribed(topic, True))
