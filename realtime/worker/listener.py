"""The LISTEN loop: deliver the events a NOTIFY carries, or read new outbox rows after the cursor.

The listener owns two psycopg async connections (``application_name``
``realtime-listener``): one sits in ``notifies()``, which holds its
connection's lock, and one reads rows. A NOTIFY whose payload carries events
starting right after the cursor, while no read is in flight, is delivered as
it is, in the same loop iteration (the fast path: no query). Any other NOTIFY
(a bare wake-up, a gap, a read in flight) wakes the reader, which reads every
row with a position above the cursor, in batches. Either way ``deliver`` gets
each event once, in commit order: positions are commit-ordered and a payload
holds consecutive ones, so "first position == cursor + 1" proves nothing was
skipped. If either connection dies, both are dropped, ``ready`` turns False,
and the loop reconnects with exponential backoff and jitter, LISTENs again,
and catches up from its cursor, so nothing committed meanwhile is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Sequence

import psycopg

from realtime.core.audience import ControlEvent, OutboxEvent
from realtime.outbox import NEWEST_POSITION, NOTIFY_CHANNEL, SELECT_COLUMNS, TABLE, payload_events, row_to_event

__all__ = ["Listener"]

logger = logging.getLogger("realtime.listener")

# Safety net: read the outbox this often even without a NOTIFY; it also
# proves the reading connection is alive.
POLL_INTERVAL = 5.0
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0


class Listener:
    """Feeds committed events to ``deliver`` exactly once each, in order.

    Args:
        conninfo: libpq connection string of the database.
        deliver: called in the event loop with each batch of new events.
        batch_size: rows read per query.
        poll_interval: seconds between reads when no NOTIFY comes (a safety net).
    """

    def __init__(
        self,
        conninfo: str,
        deliver: Callable[[Sequence[OutboxEvent | ControlEvent]], None],
        batch_size: int = 500,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self.conninfo = conninfo
        self.deliver = deliver
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        # Highest position delivered; None until the first connection.
        self.cursor: int | None = None
        self.ready = False
        self.reconnects = 0
        # Batches delivered from a NOTIFY payload and read from the table (the tests read them).
        self.from_payload = self.from_table = 0
        self.started = asyncio.Event()
        self._wake = asyncio.Event()
        self._reading = False

    async def run(self) -> None:
        """Listen until cancelled, reconnecting after every failure."""
        delay = BACKOFF_MIN
        while True:
            try:
                await self._session()
            except (psycopg.Error, OSError) as exc:
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                if self.ready:
                    logger.warning("listener connection lost, reconnecting: %s", reason)
                    delay = BACKOFF_MIN
                else:
                    logger.warning("listener cannot connect, retrying in %.1fs: %s", delay, reason)
                    delay = min(delay * 2, BACKOFF_MAX)
            finally:
                self.ready = False
            # Jitter: workers that lost PostgreSQL together come back apart.
            await asyncio.sleep(random.uniform(delay / 2, delay))
            self.reconnects += 1

    async def _session(self) -> None:
        listen = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)
        try:
            fetch = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)
            try:
                await listen.execute(f"LISTEN {NOTIFY_CHANNEL}")
                if self.cursor is None:
                    cursor = await fetch.execute(NEWEST_POSITION)
                    row = await cursor.fetchone()
                    self.cursor = int(row[0]) if row else 0
                self.ready = True
                self.started.set()
                logger.info("listening on channel %r from position %d", NOTIFY_CHANNEL, self.cursor)
                self._wake.set()  # catch up on what was committed while away
                tasks = [
                    asyncio.create_task(self._wait_notifies(listen)),
                    asyncio.create_task(self._read_loop(fetch)),
                ]
                try:
                    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in tasks:
                        task.cancel()
                    for task in tasks:
                        with contextlib.suppress(asyncio.CancelledError, psycopg.Error, OSError):
                            await task
                for task in done:
                    task.result()  # re-raise the failure that ended the session
            finally:
                await _close(fetch)
        finally:
            await _close(listen)

    async def _wait_notifies(self, connection: psycopg.AsyncConnection) -> None:
        async for notify in connection.notifies():
            if self._reading or self._wake.is_set():
                # The read in flight may have missed this commit: read again after it.
                self._wake.set()
                continue
            try:
                events = payload_events(notify.payload)
            except (ValueError, TypeError):
                logger.exception("unreadable NOTIFY payload; reading the outbox instead")
                events = []
            cursor = self.cursor
            assert cursor is not None  # set before LISTEN is in place
            if events and events[0].position == cursor + 1:
                self.cursor = events[-1].position
                self.from_payload += 1
                self._deliver(events)
            elif not events or events[-1].position > cursor:
                self._wake.set()  # a bare wake-up, or a gap (a commit that failed after positioning)
        raise psycopg.OperationalError("notification stream ended")

    def _deliver(self, events: Sequence[OutboxEvent | ControlEvent]) -> None:
        try:
            self.deliver(events)
        except Exception:
            # A routing bug must not stop delivery of later events.
            logger.exception("delivering events up to %d failed", events[-1].position)

    async def _read_loop(self, connection: psycopg.AsyncConnection) -> None:
        sql = f"SELECT {SELECT_COLUMNS} FROM {TABLE} WHERE position > %s ORDER BY position LIMIT %s"
        while True:
            # asyncio.timeout(), not wait_for(): no task per wake-up.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await self._wake.wait()
            self._wake.clear()
            self._reading = True
            try:
                while True:
                    cursor = await connection.execute(sql, (self.cursor, self.batch_size))
                    rows = await cursor.fetchall()
                    if rows:
                        events = [row_to_event(row) for row in rows]
                        self.cursor = events[-1].position
                        self.from_table += 1
                        self._deliver(events)
                    if len(rows) < self.batch_size:
                        break
            finally:
                self._reading = False


async def _close(connection: psycopg.AsyncConnection) -> None:
    with contextlib.suppress(Exception):
        await connection.close()
