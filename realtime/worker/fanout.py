"""Routing committed events to connected clients, in commit order.

:meth:`Fanout.deliver` is called by the listener with each batch. For an
event it asks the registry for the recipients (O(recipients)), then sends the
message, encoded once by PostgreSQL, with websockets' ``broadcast()``: it never
waits for a client. A control event goes to :class:`~realtime.worker.control.Control`
before the next event is routed. A client that cannot keep up is closed with
1013 at once; nobody else waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import broadcast

from realtime.conf import settings
from realtime.core.audience import ControlEvent, OutboxEvent
from realtime.core.protocol import CloseCode
from realtime.worker.metrics import Metrics
from realtime.worker.registry import Client, Registry, State

if TYPE_CHECKING:
    from realtime.worker.control import Control

__all__ = ["Fanout"]

logger = logging.getLogger("realtime.server")


class Fanout:
    """Delivers events to the clients in ``registry``; ``control`` must be set before the first batch."""

    def __init__(self, registry: Registry, metrics: Metrics, spawn: Callable[[Awaitable[Any]], None]) -> None:
        self.registry = registry
        self.metrics = metrics
        self.spawn = spawn
        self.control: Control | None = None

    def deliver(self, events: Sequence[OutboxEvent | ControlEvent]) -> None:
        """Route each committed event to its connected recipients.

        One pass over the recipients per event, then ``broadcast()`` of the
        message encoded once. The cost that remains is a ``send()`` system
        call per recipient. A control event takes effect before the next
        event is routed: a revoked client receives nothing committed after it.
        """
        control = self.control
        assert control is not None, "Fanout.control is not set"
        now = time.time()
        routed = frames = 0
        max_pending, max_buffer = settings.MAX_PENDING, settings.MAX_BUFFER
        for event in events:
            if isinstance(event, ControlEvent):
                control.apply(event)
                continue
            if control.holding:
                control.log(event)
            recipients = self.registry.recipients(event.audience)
            if not recipients:
                continue
            position, message = event.position, event.message
            live, overflowing = [], []
            for client in recipients:
                if client.cursor >= position or client.held_from is not None:
                    continue  # already has it, or its re-read rights decide (Control.release)
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
                        self.check_buffer(client)
            for client in overflowing:
                self.drop_slow(client, "too many events queued during replay")
            routed += 1
            frames += len(live)
            self.metrics.lag.observe(max(0.0, now - event.created))
        # Counted once per batch: a counter's lock costs as much as routing a small event.
        self.metrics.events.inc(routed)
        self.metrics.frames.inc(frames)

    def push(self, client: Client, events: Sequence[OutboxEvent]) -> None:
        """Send ``events`` to ``client`` now, or queue them after its replay if it is still replaying."""
        if not events or client.state is State.CLOSED:
            return
        client.cursor = max(client.cursor, events[-1].position)
        if client.pending is not None:
            client.pending.extend((event.position, event.message) for event in events)
            client.pending_bytes += sum(len(event.message) for event in events)
            return
        for event in events:
            broadcast([client.ws], event.message)
        self.check_buffer(client)

    def check_buffer(self, client: Client) -> None:
        """Close ``client`` if its unsent data passed ``MAX_BUFFER``."""
        transport = client.ws.transport
        if transport is not None and transport.get_write_buffer_size() > settings.MAX_BUFFER:
            self.drop_slow(client, "not reading fast enough")

    def drop_slow(self, client: Client, reason: str) -> None:
        """Close a client that cannot keep up with 1013; nobody else waits for it."""
        logger.warning("%s user %d closed 1013: %s", client.remote, client.identity.user_id, reason)
        self.metrics.slow_closed.inc()
        # The frame in hand, and whatever was queued for the client, will not be sent.
        self.metrics.dropped.inc(1 + len(client.pending or ()))
        self.close(client, CloseCode.TRY_AGAIN_LATER, "too slow")

    def close(self, client: Client, code: CloseCode, reason: str) -> None:
        """Stop routing to ``client`` at once, then close it with ``code`` in the background."""
        self.forget(client)
        self.spawn(client.ws.close(code, reason))

    def forget(self, client: Client) -> None:
        """Stop routing to ``client`` at once (registry and presence); safe to call twice."""
        client.state = State.CLOSED
        self.registry.remove(client)
        if client.held_from is not None and self.control is not None:
            self.control.release(client)


def spawner(tasks: set[asyncio.Task[Any]]) -> Callable[[Awaitable[Any]], None]:
    """Return ``spawn(coroutine)``: run it as a task kept in ``tasks`` until it ends."""

    def spawn(coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return spawn
