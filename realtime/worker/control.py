"""Logouts and rights changes, applied in commit order: nothing committed after a revocation reaches it.

- A ``session_ended`` control event takes the session's clients out of routing
  at once and closes them with 4401.
- A ``user_changed`` event *holds* the affected clients: :class:`~realtime.worker.fanout.Fanout`
  skips them while their rights are re-read, and logs every event routed
  meanwhile. With the new rights, :meth:`Control.release` sends each client
  what it missed by those rights, in order; a client whose session is no
  longer valid is closed with 4401 instead.
- A login in flight when a relevant control event arrived is held the same
  way (:meth:`Control.changed_since`), and every open session is re-checked
  now and then (:meth:`Control.revalidate_forever`).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import random
from collections import deque
from typing import Any

from django.db import DatabaseError
from websockets.asyncio.server import broadcast

from realtime.conf import settings
from realtime.core import protocol
from realtime.core.audience import ControlEvent, Identity, OutboxEvent, matches
from realtime.core.protocol import CloseCode
from realtime.outbox import SESSION_ENDED, USER_CHANGED
from realtime.worker.fanout import Fanout
from realtime.worker.registry import Client, Registry, State
from realtime.worker.subscriptions import allowed_topics
from realtime.worker.verifier import Verifier

__all__ = ["HELD_LOG_BYTES", "RECENT_CONTROLS", "Control"]

logger = logging.getLogger("realtime.server")

# Events kept for held clients, at most (else they are closed 1013, and resume on reconnection).
HELD_LOG_BYTES = 64 * 1024 * 1024
# Control events remembered to check logins that were in flight when they arrived.
RECENT_CONTROLS = 1024


class Control:
    """Applies control events to the clients in ``registry``; ``fanout`` sends and closes."""

    def __init__(self, registry: Registry, verifier: Verifier, fanout: Fanout) -> None:
        self.registry = registry
        self.verifier = verifier
        self.fanout = fanout
        # Clients whose rights are being re-read, and every event routed since the
        # oldest of them was held (None while no client is held).
        self._held: dict[Client, None] = {}
        self._log: list[OutboxEvent] | None = None
        self._log_bytes = 0
        self._recent: deque[ControlEvent] = deque(maxlen=RECENT_CONTROLS)
        self._released: dict[Client, asyncio.Event] = {}

    @property
    def holding(self) -> bool:
        """True while some client is held: ``Fanout`` then passes every event to :meth:`log`."""
        return self._log is not None

    def apply(self, event: ControlEvent) -> None:
        """Apply one control event, before any later event is routed."""
        self._recent.append(event)
        if event.name == SESSION_ENDED:
            for client in self.registry.for_session(event.data.get("session", "")):
                self.revoke(client, "session ended")
        elif event.name == USER_CHANGED:
            clients: set[Client] = set()
            for user_id in event.data.get("users", ()):
                clients |= self.registry.for_user(user_id)
            for group in event.data.get("groups", ()):
                clients |= self.registry.for_group(group)
            for client in clients:
                self.hold(client, event.position)

    def log(self, event: OutboxEvent) -> None:
        """Keep ``event`` for the held clients; too many kept closes them (they resume)."""
        assert self._log is not None
        self._log.append(event)
        self._log_bytes += len(event.message)
        if len(self._log) > settings.MAX_PENDING or self._log_bytes > HELD_LOG_BYTES:
            for client in list(self._held):
                self.fanout.drop_slow(client, "too many events while its rights were re-read")
            self._held.clear()
            self._log, self._log_bytes = None, 0

    def changed_since(self, position: int, identity: Identity) -> bool:
        """Return True if a control event after ``position`` may concern ``identity`` (or cannot be known)."""
        for event in reversed(self._recent):
            if event.position <= position:
                return False
            if event.name == SESSION_ENDED and event.data.get("session") == identity.session_hash:
                return True
            if event.name == USER_CHANGED and (
                identity.user_id in event.data.get("users", ())
                or not identity.groups.isdisjoint(event.data.get("groups", ()))
            ):
                return True
        # Every remembered control is newer: older ones may have been forgotten.
        return len(self._recent) == self._recent.maxlen

    def revoke(self, client: Client, reason: str) -> None:
        """Close ``client`` with 4401; it receives nothing from now on."""
        if client.state is State.CLOSED:
            return
        logger.info("%s user %d: %s, closing 4401", client.remote, client.identity.user_id, reason)
        self.fanout.close(client, CloseCode.AUTH_FAILED, reason)

    def hold(self, client: Client, position: int) -> None:
        """Re-read ``client``'s rights; meanwhile, events after ``position`` wait for the answer."""
        if client.state is State.CLOSED:
            return
        client.rights_version += 1
        if client.held_from is not None:
            return  # the re-read in progress sees the new version and reads again
        client.held_from = position
        self._held[client] = None
        if self._log is None:
            self._log = []
        self.fanout.spawn(self._reread(client))

    async def released(self, client: Client) -> None:
        """Wait until ``client`` is not held (its rights re-read, or it closed)."""
        if client.held_from is not None:
            await self._released.setdefault(client, asyncio.Event()).wait()

    def release(self, client: Client) -> None:
        """End ``client``'s hold: send it, by its current rights, what was routed meanwhile."""
        held_from, client.held_from = client.held_from, None
        self._held.pop(client, None)
        waiting = self._released.pop(client, None)
        if waiting is not None:
            waiting.set()
        log = self._log or []
        if not self._held:
            self._log, self._log_bytes = None, 0
        if client.state is State.CLOSED or held_from is None:
            return
        start = bisect.bisect_right(log, max(held_from, client.cursor), key=lambda event: event.position)
        self.fanout.push(client, [e for e in log[start:] if matches(client.identity, client.topics, e.audience)])

    async def _reread(self, client: Client) -> None:
        old = client.identity
        try:
            async with asyncio.timeout(settings.AUTH_TIMEOUT):
                while True:
                    version = client.rights_version
                    identity = await self.verifier.identity_for_session(old.session_key, old.user_id)
                    allowed = await allowed_topics(identity, client.topics) if identity is not None else []
                    if client.rights_version == version or client.state is State.CLOSED:
                        break
        except (DatabaseError, TimeoutError) as exc:
            if client.state is not State.CLOSED:
                logger.warning("%s user %d closed 1013: cannot re-check rights: %s", client.remote, old.user_id, exc)
                self.fanout.close(client, CloseCode.TRY_AGAIN_LATER, "cannot re-check rights, try again")
            return
        if client.state is State.CLOSED:
            return
        if identity is None:
            self.revoke(client, "access revoked")
            return
        self.apply_identity(client, identity, allowed)
        self.release(client)

    def apply_identity(self, client: Client, identity: Identity, allowed: list[str]) -> None:
        """Give ``client`` its re-read rights; it keeps only the ``allowed`` ones of its topics.

        Each topic it loses is announced with ``unsubscribed``, as if it had asked.
        """
        self.registry.update_identity(client, identity)
        for topic in sorted(client.topics.difference(allowed)):
            self.registry.unsubscribe(client, topic)
            broadcast([client.ws], protocol.encode_subscribed(topic, False))

    async def revalidate_forever(self) -> None:
        """Re-check every open session now and then (catches deletions that send no signal)."""
        while True:
            await asyncio.sleep(settings.REVALIDATE_INTERVAL * random.uniform(0.9, 1.1))
            sessions: dict[tuple[str, int], list[Client]] = {}
            for client in self.registry.clients:
                sessions.setdefault((client.identity.session_key, client.identity.user_id), []).append(client)
            # One session at a time (not one connection): background hygiene, not a burst.
            for (session_key, user_id), clients in sessions.items():
                versions = {c: c.rights_version for c in clients if c.state is not State.CLOSED}
                if not versions:
                    continue
                try:
                    identity = await self.verifier.identity_for_session(session_key, user_id)
                except DatabaseError as exc:
                    logger.warning("cannot re-check sessions now, will retry: %s", exc)
                    break
                await self._revalidated(identity, versions)

    async def _revalidated(self, identity: Identity | None, versions: dict[Client, int]) -> None:
        for client, version in versions.items():
            if client.state is State.CLOSED:
                continue
            if identity is None:
                self.revoke(client, "access revoked")
                continue
            unchanged = client.held_from is None and client.rights_version == version
            if unchanged:  # else a rights change came in meanwhile: its own re-read decides
                allowed = await allowed_topics(identity, client.topics)
                if client.held_from is None and client.rights_version == version:
                    self.apply_identity(client, identity, allowed)

    def stats(self) -> dict[str, Any]:
        """Held clients and logged events, for tests and debugging."""
        return {"held": len(self._held), "logged": len(self._log or ())}
