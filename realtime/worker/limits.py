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
- **Control frames and fragments.** Pings, pongs and continuation frames
  count against a budget as large as the messages' (``MESSAGE_BURST``,
  ``MESSAGES_PER_MINUTE``); past it the connection is closed with 1008,
  before or after authentication, and aborted if it goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.frames import Frame, Opcode

from realtime.conf import settings
from realtime.core.protocol import CloseCode
from realtime.core.ratelimit import TokenBucket

__all__ = [
    "BACKLOG",
    "HARD_MARGIN",
    "connection_limit",
    "guarded_connection",
    "raise_open_files_limit",
    "reserved_files",
]

logger = logging.getLogger("realtime.server")

# Sockets accepted past the connection limit while their requests are read
# (they get a 503); beyond this margin they are reset on accept.
HARD_MARGIN = 64
# The listen queue, and the most sockets asyncio accepts in one round: about
# three rounds are open before their connections are counted.
BACKLOG = 100


def reserved_files() -> int:
    """File descriptors kept for everything but counted clients.

    The worker's own (listener, login pool, up to ``THREADS`` pool connections,
    logs, listening sockets), the sockets reset past the connection limit
    (``HARD_MARGIN``), and about three accept rounds not yet counted.
    """
    return int(settings.THREADS) + 32 + HARD_MARGIN + 3 * BACKLOG


def connection_limit() -> int:
    """``MAX_CONNECTIONS``, lowered to what this process may open (RLIMIT_NOFILE) less ``reserved_files()``.

    Past its open-files limit a process can neither accept nor reach the
    database: better answer 503 to the next client than fail everyone.
    """
    limit = int(settings.MAX_CONNECTIONS)
    try:
        import resource
    except ImportError:  # not on Windows
        return limit
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return limit
    return max(1, min(limit, soft - reserved_files()))


def raise_open_files_limit() -> None:
    """Each connection is a file descriptor: lift the soft limit (often 1024) to the hard one."""
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))


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
            # Pings and pongs, and the continuation frames of fragmented messages (empty ones never
            # reach max_size): frames that cost the worker work without being messages.
            counted = isinstance(event, Frame) and event.opcode in (Opcode.PING, Opcode.PONG, Opcode.CONT)
            if counted and not self.control_frames.allow():
                if self.closing_task is not None:
                    # Still flooding after the close: websockets would keep answering its pings.
                    self.transport.abort()
                else:
                    logger.info("%s closed 1008: too many pings or fragments", _peer(self))
                    self.closing_task = asyncio.ensure_future(
                        self.close(CloseCode.POLICY_VIOLATION, "too many control frames or fragments")
                    )
                return
            super().process_event(event)

    return GuardedConnection


def _peer(connection: ServerConnection) -> str:
    address = connection.remote_address
    return str(address[0]) if isinstance(address, tuple) else "unix"
