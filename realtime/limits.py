"""Limits that hold before a connection is authenticated, in websockets' own connection class.

:func:`guarded_connection` returns the ``create_connection`` class for
``serve()``. Its connections defend the worker from peers that never finish
a handshake or never read:

- **Open sockets.** websockets counts a connection in ``all_connections``
  only after its handshake; every accepted socket has a handler task from its
  first byte, so ``len(server.handler_tasks)`` is what holds file descriptors.
  Past ``limit() + HARD_MARGIN`` sockets, a new one is reset at once, so a
  flood of unfinished handshakes cannot exhaust the process's open files
  (``process_request`` answers 503 to complete requests past ``limit()``).
- **Unread output.** websockets answers each ping with a pong and never
  waits for the peer to read it. A peer whose unsent data passes
  ``REALTIME["MAX_BUFFER"]`` is not reading: its socket is aborted.
- **Control frames.** Pings and pongs count against the same budget as
  messages (``MESSAGE_BURST``, ``MESSAGES_PER_MINUTE``); past it the
  connection is closed with 1008, before or after authentication.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.frames import Frame, Opcode

from realtime.conf import settings
from realtime.protocol import CloseCode
from realtime.ratelimit import TokenBucket

__all__ = ["HARD_MARGIN", "guarded_connection"]

logger = logging.getLogger("realtime.server")

# Sockets accepted past the connection limit while their requests are read
# (they get a 503); beyond this margin they are reset on accept.
HARD_MARGIN = 64


def guarded_connection(limit: Callable[[], int]) -> type[ServerConnection]:
    """Return a ``ServerConnection`` class that applies the limits above; ``limit()`` is the worker's cap."""

    class GuardedConnection(ServerConnection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.control_frames = TokenBucket(settings.MESSAGE_BURST, settings.MESSAGES_PER_MINUTE)
            self.max_buffer = settings.MAX_BUFFER
            self.closing_task: asyncio.Task[None] | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)  # registers this socket's handler task
            if len(self.server.handler_tasks) > limit() + HARD_MARGIN:
                # The handshake fails at once and the handler task ends; no fd is held.
                transport.abort()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            transport = self.transport
            if not transport.is_closing() and transport.get_write_buffer_size() > self.max_buffer:
                logger.info("%s aborted: not reading (%d bytes unsent)", _peer(self), transport.get_write_buffer_size())
                transport.abort()

        def process_event(self, event: Any) -> None:
            is_control = isinstance(event, Frame) and event.opcode in (Opcode.PING, Opcode.PONG)
            if is_control and not self.control_frames.allow():
                if self.closing_task is not None:
                    # Still flooding after the close: websockets would keep answering its pings.
                    self.transport.abort()
                else:
                    logger.info("%s closed 1008: too many pings", _peer(self))
                    self.closing_task = asyncio.ensure_future(
                        self.close(CloseCode.POLICY_VIOLATION, "too many control frames")
                    )
                return
            super().process_event(event)

    return GuardedConnection


def _peer(connection: ServerConnection) -> str:
    address = connection.remote_address
    return str(address[0]) if isinstance(address, tuple) else "unix"
