"""The floor (issue 14): the least a server can do to turn PostgreSQL NOTIFYs into websocket frames.

One asyncio process: ``websockets`` on ``127.0.0.1:PORT`` and one psycopg
connection that LISTENs on ``CHANNEL``. Nothing else: no authentication, no
outbox, no reads, no presence, no limits. It is what this project's numbers
are divided by in the report ("cost vs floor").

Contract:

- a client's first text message names its user: ``{"user": <int>}``; the
  server answers ``{"type":"welcome","user":{"id":<int>}}`` (what the load
  client waits for) and ignores anything the client sends later; any other
  first message, or none within 10 s, is closed with 4400;
- each NOTIFY payload on ``CHANNEL`` is ``{"u": <user id or null>, "m": <frame>}``;
  the frame is ``broadcast()`` as is to every socket of user ``u``, or to
  every socket when ``u`` is null (the publisher encodes it once);
- ``GET /readyz`` answers 200 once the LISTEN is in place, 503 before;
- the websocket options are this project's defaults (no permessage-deflate,
  pings every 10 s with a 15 s timeout, 64 KiB inbound messages), so that
  both pay for the same wire work;
- SIGTERM stops it at once (no closing handshakes); so does losing the
  LISTEN connection (exit status 1: a floor does not reconnect).

Run: ``DATABASE_URL=<libpq string> python -m bench.floor --port PORT --channel CHANNEL``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from typing import Any, NoReturn

import psycopg
from psycopg import sql
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.http11 import Request, Response

__all__ = ["Floor", "main"]

HELLO_TIMEOUT = 10.0


class Floor:
    """The sockets by user, the LISTEN loop and the websocket handler."""

    def __init__(self) -> None:
        self.everyone: set[ServerConnection] = set()
        self.by_user: dict[int, set[ServerConnection]] = {}
        self.ready = False

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Answer ``/readyz`` over plain HTTP; let every other request upgrade."""
        if request.path == "/readyz":
            return connection.respond(200 if self.ready else 503, "ok\n" if self.ready else "not listening\n")
        return None

    async def handler(self, ws: ServerConnection) -> None:
        """Hello → welcome, then hold the socket (in ``everyone`` and its user's set) until it closes."""
        try:
            first = await asyncio.wait_for(ws.recv(), HELLO_TIMEOUT)
            user = json.loads(first)["user"]
            if not isinstance(user, int):
                raise TypeError("user is not an int")
        except (TimeoutError, ValueError, TypeError, KeyError):
            await ws.close(4400, 'first message: {"user": <int>}')
            return
        mine = self.by_user.setdefault(user, set())
        mine.add(ws)
        self.everyone.add(ws)
        try:
            await ws.send(f'{{"type":"welcome","user":{{"id":{user}}}}}')
            async for _ in ws:
                pass  # the floor reads nothing from clients
        finally:
            self.everyone.discard(ws)
            mine.discard(ws)
            if not mine:
                self.by_user.pop(user, None)

    async def listen(self, conninfo: str, channel: str) -> None:
        """LISTEN on ``channel`` and broadcast every payload's frame; return only if the connection ends."""
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as connection:
            await connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            self.ready = True
            async for notify in connection.notifies():
                payload: dict[str, Any] = json.loads(notify.payload)
                user = payload["u"]
                broadcast(self.everyone if user is None else self.by_user.get(user, ()), payload["m"])
        self.ready = False


async def _serve(port: int, channel: str, conninfo: str) -> int:
    floor = Floor()
    stop = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set_result, None)
    server = await serve(
        floor.handler,
        "127.0.0.1",
        port,
        process_request=floor.process_request,
        compression=None,
        ping_interval=10.0,
        ping_timeout=15.0,
        max_size=64 * 1024,
    )
    print(f"floor (pid {os.getpid()}) on 127.0.0.1:{port}, LISTEN {channel}", flush=True)
    listener = asyncio.create_task(floor.listen(conninfo, channel))
    await asyncio.wait([listener, stop], return_when=asyncio.FIRST_COMPLETED)
    server.close(close_connections=False)
    if listener.done():
        print(f"floor: the LISTEN connection ended: {listener.exception()!r}", file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> NoReturn:
    """Parse ``--port`` and ``--channel``, read ``DATABASE_URL``, serve until SIGTERM, then exit the process."""
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--channel", required=True, help="the NOTIFY channel to LISTEN on")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loop = asyncio.new_event_loop()
    status = loop.run_until_complete(_serve(args.port, args.channel, os.environ["DATABASE_URL"]))
    # Not asyncio.run(): it would unwind thousands of handler tasks first. The kernel closes the sockets.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
