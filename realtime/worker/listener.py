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

The reading connection may be on a streaming replica (``READ_DATABASE``),
which shows commits in the primary's order but late. Every NOTIFY says which
position its transaction ends at (``payload_position()``), and on connecting
the listener asks the primary for its newest position: ``known`` is the
highest position known to be committed. A read that leaves the cursor below
``known`` means the replica lags: the reader asks the replica how far it has
got (``REACHED_POSITION``), with a backoff of 1 ms growing to 100 ms, and
reads again once it got further, until it has shown ``known``. It never
skips a position: the cursor only moves to rows it read (or a payload that
follows it). ``lag_seconds()`` and ``lag_positions()`` say how far behind it
is; LISTEN stays on the primary.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence

import psycopg

from realtime.core.audience import ControlEvent, OutboxEvent
from realtime.outbox import (
    NEWEST_POSITION,
    NOTIFY_CHANNEL,
    SELECT_COLUMNS,
    TABLE,
    payload_events,
    payload_position,
    row_to_event,
)
from realtime.retention import REACHED_POSITION
from realtime.worker.db import read_conninfo as configured_read_conninfo

__all__ = ["Listener"]

logger = logging.getLogger("realtime.listener")

# Safety net: read the outbox this often even without a NOTIFY; it also
# proves the reading connection is alive.
POLL_INTERVAL = 5.0
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0
# Between asks of a lagging replica how far it has got: short first (replicas
# usually lag by milliseconds), then at most 10 queries a second.
LAG_BACKOFF_MIN, LAG_BACKOFF_MAX = 0.001, 0.1
# Positions learnt within this many seconds of each other share one entry of
# the lag record: it stays small under any rate, and the lag is overstated by
# at most this much.
LAG_RESOLUTION = 0.01


class Listener:
    """Feeds committed events to ``deliver`` exactly once each, in order.

    Args:
        conninfo: libpq connection string of the database.
        deliver: called in the event loop with each batch of new events.
        batch_size: rows read per query.
        poll_interval: seconds between reads when no NOTIFY comes (a safety net).
        read_conninfo: libpq connection string of the database the outbox is
            read from (a streaming replica of ``conninfo``'s); by default
            ``REALTIME["READ_DATABASE"]``'s, or ``conninfo`` when that is None.
    """

    def __init__(
        self,
        conninfo: str,
        deliver: Callable[[Sequence[OutboxEvent | ControlEvent]], None],
        batch_size: int = 500,
        poll_interval: float = POLL_INTERVAL,
        read_conninfo: str | None = None,
    ) -> None:
        self.conninfo = conninfo
        self.read_conninfo = read_conninfo or configured_read_conninfo() or conninfo
        self.deliver = deliver
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        # Highest position delivered; None until the first connection.
        self.cursor: int | None = None
        # Highest position known to be committed (from NOTIFYs and the primary).
        self.known = 0
        # Highest position the read database was seen to have reached (its newest
        # row, or its retention horizon); reset on reconnecting: it may be another server.
        self._reached = 0
        # (position, monotonic time it was learnt) of known positions not yet shown by
        # the read database, oldest first: the lag record.
        self._unseen: deque[tuple[int, float]] = deque()
        self.ready = False
        self.reconnects = 0
        # Batches delivered from a NOTIFY payload and read from the table, and how often the
        # read database was asked how far it had got because it lagged (tests and benchmarks read them).
        self.from_payload = self.from_table = self.lag_checks = 0
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

    def lag_seconds(self) -> float:
        """How long the oldest position known to be committed but not yet read has waited; 0 when caught up.

        With ``READ_DATABASE``, the replica's lag as this worker feels it.
        Call it in the event loop's thread.
        """
        if not self._unseen:
            return 0.0
        return time.monotonic() - self._unseen[0][1]

    def lag_positions(self) -> int:
        """How many positions the worker knows to be committed beyond what it has read (an upper bound: gaps count)."""
        return max(0, self.known - max(self.cursor or 0, self._reached))

    def _learn(self, position: int) -> None:
        """Record that ``position`` is committed (the lag record keeps when it was learnt, if unread)."""
        if position <= self.known:
            return
        self.known = position
        if position <= max(self.cursor or 0, self._reached):
            return
        now = time.monotonic()
        if self._unseen and now - self._unseen[-1][1] < LAG_RESOLUTION:
            self._unseen[-1] = (position, self._unseen[-1][1])
        else:
            self._unseen.append((position, now))

    def _shown(self, position: int) -> None:
        """The read database has shown every position up to ``position``: drop them from the lag record."""
        unseen = self._unseen
        while unseen and unseen[0][0] <= position:
            unseen.popleft()

    async def _session(self) -> None:
        listen = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)
        try:
            fetch = await psycopg.AsyncConnection.connect(self.read_conninfo, autocommit=True)
            try:
                await listen.execute(f"LISTEN {NOTIFY_CHANNEL}")
                # From the primary, after LISTEN: every later commit is notified, every
                # earlier one is at or below this position (a replica may not show it yet).
                cursor = await listen.execute(NEWEST_POSITION)
                row = await cursor.fetchone()
                newest = int(row[0]) if row else 0
                if self.cursor is None:
                    self.cursor = self.known = newest
                self._reached = 0
                self._learn(newest)
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
            payload = notify.payload
            try:
                upto = payload_position(payload)
                events = [] if self._reading or self._wake.is_set() else payload_events(payload)
            except (ValueError, TypeError):
                logger.exception("unreadable NOTIFY payload; reading the outbox instead")
                upto, events = None, []
            cursor = self.cursor
            assert cursor is not None  # set before LISTEN is in place
            if self._reading or self._wake.is_set():
                # The read in flight may have missed this commit: read again after it.
                if upto is not None:
                    self._learn(upto)
                self._wake.set()
                continue
            if events and events[0].position == cursor + 1:
                self.cursor = events[-1].position
                if self.cursor > self.known:
                    self.known = self.cursor
                if self._unseen:
                    self._shown(self.cursor)
                self.from_payload += 1
                self._deliver(events)
            elif upto is None or upto > cursor:
                # A bare wake-up, or a gap (a commit that failed after positioning): read the table.
                if upto is not None:
                    self._learn(upto)
                self._wake.set()
        raise psycopg.OperationalError("notification stream ended")

    def _deliver(self, events: Sequence[OutboxEvent | ControlEvent]) -> None:
        try:
            self.deliver(events)
        except Exception:
            # A routing bug must not stop delivery of later events.
            logger.exception("delivering events up to %d failed", events[-1].position)

    async def _read_loop(self, connection: psycopg.AsyncConnection) -> None:
        while True:
            # asyncio.timeout(), not wait_for(): no task per wake-up.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await self._wake.wait()
            self._wake.clear()
            self._reading = True
            try:
                await self._catch_up(connection)
            finally:
                self._reading = False

    async def _catch_up(self, connection: psycopg.AsyncConnection) -> None:
        """Read until the read database has shown every position known to be committed; wait while it lags."""
        reached: int | None = None  # how far it had got before the last read began
        asked = False
        delay = LAG_BACKOFF_MIN
        while True:
            await self._read_visible(connection)
            if reached is not None and reached > self._reached:
                self._reached = reached  # that read saw every row at or below it
            shown = max(self.cursor or 0, self._reached)
            if self._unseen:
                self._shown(shown)
            if shown >= self.known:
                return
            # Behind what NOTIFYs (or the primary) said: the read database lags. Ask how far it
            # has got, and read again once that is further than what was read.
            while True:
                if asked:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, LAG_BACKOFF_MAX)
                asked = True
                self.lag_checks += 1
                cursor = await connection.execute(REACHED_POSITION)
                row = await cursor.fetchone()
                reached = int(row[0]) if row else 0
                if reached > shown:
                    # It moves: after this read, ask again at once, then back off from the start.
                    asked, delay = False, LAG_BACKOFF_MIN
                    break

    async def _read_visible(self, connection: psycopg.AsyncConnection) -> None:
        """Deliver every row after the cursor that the read database shows, in batches."""
        sql = f"SELECT {SELECT_COLUMNS} FROM {TABLE} WHERE position > %s ORDER BY position LIMIT %s"
        while True:
            cursor = await connection.execute(sql, (self.cursor, self.batch_size))
            rows = await cursor.fetchall()
            if rows:
                events = [row_to_event(row) for row in rows]
                self.cursor = events[-1].position
                self.from_table += 1
                self._deliver(events)
            if len(rows) < self.batch_size:
                return


async def _close(connection: psycopg.AsyncConnection) -> None:
    with contextlib.suppress(Exception):
        await connection.close()
