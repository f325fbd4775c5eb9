"""Presence: who is connected, across every worker, kept in PostgreSQL.

Each worker process owns one :class:`PresenceTracker`:

- The connection handler calls ``joined()``, ``subscribed()``,
  ``unsubscribed()`` and ``left()``. They do no I/O: they update the
  tracker's picture of this worker's connections in memory.
- ``run()``, a background task, writes that picture every
  ``REALTIME["PRESENCE_INTERVAL"]`` seconds (in a thread, one transaction):
  the worker's heartbeat, which extends its lease by :func:`lease_seconds`,
  then the connections and subscriptions added or removed since the last
  round. A connection that comes and goes within one round is never written.
  It then expires the workers whose lease ran out (a worker killed with
  SIGKILL), deleting their rows. A database error is logged and the same
  changes are tried again next round.
- ``close()``, on clean shutdown, deletes this worker's rows at once.

Presence events: for topics matching ``REALTIME["PRESENCE_TOPICS"]``, the
transaction that adds the first subscription of a user to a topic, on any
worker, publishes ``presence.join`` to that topic; the one that removes the
last (a disconnect, an unsubscribe, a shutdown or an expired worker)
publishes ``presence.leave``. Both go through the outbox in the same
transaction as the row change, so they are delivered like any event, and
only if it commits. A transaction-scoped advisory lock per (user, topic),
taken in a fixed order, makes "first" and "last" exact across workers: two
workers can never both announce. A user counts as present while any row
exists for them, including rows of a dead worker not yet expired: a user who
reconnects to another worker before that is neither announced as leaving nor
as joining again.

From Django code, :func:`realtime.presence.online_users` and
:func:`realtime.presence.online_connections` read who is connected to a live
worker (one whose lease has not run out).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import ipaddress
import itertools
import logging
import os
import secrets
import socket
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from django.db import DatabaseError, connection, transaction
from django.db.models import DateTimeField, ExpressionWrapper, Q, Value
from django.db.models.functions import Now

from realtime.conf import settings
from realtime.models import PresenceConnection, PresenceSubscription, PresenceWorker
from realtime.outbox import publish
from realtime.worker.db import run_sync

if TYPE_CHECKING:
    from realtime.worker.registry import Client

__all__ = [
    "PRESENCE_JOIN",
    "PRESENCE_LEAVE",
    "PresenceTracker",
    "expire_workers",
    "lease_seconds",
]

logger = logging.getLogger("realtime.presence")

PRESENCE_JOIN = "presence.join"
PRESENCE_LEAVE = "presence.leave"

# A worker's rows outlive its last heartbeat by 3 intervals and this margin.
LEASE_MISSED_ROUNDS = 3
LEASE_MARGIN = 2.0
# How long a shutting-down worker waits for the database to remove its rows.
CLOSE_TIMEOUT = 10.0


def lease_seconds(interval: float) -> float:
    """Return how long a worker's rows stay live after a heartbeat sent every ``interval`` seconds."""
    return LEASE_MISSED_ROUNDS * interval + LEASE_MARGIN


@dataclasses.dataclass(frozen=True, slots=True)
class _Connection:
    """What presence stores about one connection (immutable: a snapshot)."""

    id: str
    user_id: int
    username: str
    client_ip: str
    connected_at: float
    topics: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True, slots=True)
class _WorkerRow:
    id: str
    hostname: str
    pid: int
    started_at: datetime


_NONE = _Connection("", 0, "", "", 0.0)


class PresenceTracker:
    """This worker's connections, written to the presence tables in the background.

    ``joined()``, ``subscribed()``, ``unsubscribed()`` and ``left()`` must be
    called from the event loop; they never block. ``run()`` must run as a task
    while the worker serves; after cancelling it, call ``close()`` once.
    """

    def __init__(self, cursor: Callable[[], int | None] = lambda: None) -> None:
        """``cursor`` returns the worker's listener position, written with each heartbeat."""
        self.cursor = cursor
        self.worker_id = secrets.token_hex(8)
        self._row = _WorkerRow(self.worker_id, socket.gethostname()[:255], os.getpid(), datetime.now(UTC))
        self._numbers = itertools.count(1)
        # What this worker holds now, and what the database holds for it.
        self._live: dict[Client, _Connection] = {}
        self._written: dict[str, _Connection] = {}
        self._inflight: asyncio.Future[dict[str, _Connection]] | None = None

    def sizes(self) -> tuple[int, int]:
        """Return how many connections this tracker holds live (in memory) and written (in the database)."""
        return len(self._live), len(self._written)

    # Hooks for the connection handler (no I/O).

    def joined(self, client: Client) -> None:
        """Record that ``client`` is connected, with the topics it holds now."""
        if client in self._live:
            return
        identity = client.identity
        self._live[client] = _Connection(
            id=f"{self.worker_id}.{next(self._numbers)}",
            user_id=identity.user_id,
            username=identity.username[:255],
            client_ip=_ip_of(client.remote),
            connected_at=client.connected_at,
            topics=client.topics,
        )

    def subscribed(self, client: Client, topic: str) -> None:
        """Record that ``client`` subscribed to ``topic`` (no effect before ``joined()``)."""
        entry = self._live.get(client)
        if entry is not None and topic not in entry.topics:
            self._live[client] = dataclasses.replace(entry, topics=entry.topics | {topic})

    def unsubscribed(self, client: Client, topic: str) -> None:
        """Record that ``client`` left ``topic``."""
        entry = self._live.get(client)
        if entry is not None and topic in entry.topics:
            self._live[client] = dataclasses.replace(entry, topics=entry.topics - {topic})

    def left(self, client: Client) -> None:
        """Record that ``client`` disconnected; safe to call twice."""
        self._live.pop(client, None)

    # Background work.

    async def run(self) -> None:
        """Write presence, then expire dead workers, every ``PRESENCE_INTERVAL`` seconds, until cancelled."""
        while True:
            await self.flush()
            await asyncio.sleep(settings.PRESENCE_INTERVAL)

    async def flush(self) -> None:
        """Run one round now: heartbeat, changes since the last round, expiry of dead workers.

        Errors are logged (database errors as warnings) and the round's
        changes are retried next time; this never raises except on cancel.
        """
        wanted = {entry.id: entry for entry in self._live.values()}
        future = asyncio.ensure_future(
            run_sync(
                _round,
                self._row,
                wanted,
                self._written,
                lease=lease_seconds(settings.PRESENCE_INTERVAL),
                patterns=tuple(settings.PRESENCE_TOPICS),
                cursor=self.cursor() or 0,
            )
        )
        self._inflight = future
        try:
            # Shielded: cancelling run() lets the round finish, and close() waits for it.
            self._written = await asyncio.shield(future)
        except DatabaseError as exc:
            logger.warning("presence: cannot write to the database, will retry: %s", exc)
        except Exception:
            logger.exception("presence: round failed, will retry")

    async def close(self) -> None:
        """Delete this worker's presence rows, announcing leaves (clean shutdown).

        Call after cancelling ``run()``. If the database cannot be reached
        within ``CLOSE_TIMEOUT`` seconds, the rows expire with the lease.
        """
        if self._inflight is not None and not self._inflight.done():
            with contextlib.suppress(Exception):
                await self._inflight
        self._live.clear()
        try:
            await asyncio.wait_for(
                run_sync(expire_workers, [self.worker_id], patterns=tuple(settings.PRESENCE_TOPICS)),
                CLOSE_TIMEOUT,
            )
        except (DatabaseError, TimeoutError) as exc:
            logger.warning("presence: cannot remove this worker's rows; they expire with its lease: %s", exc)
        else:
            logger.info("presence: removed worker %s", self.worker_id)


# Database work (sync, in a thread).


def _round(
    row: _WorkerRow,
    wanted: Mapping[str, _Connection],
    written: Mapping[str, _Connection],
    *,
    lease: float,
    patterns: tuple[str, ...],
    cursor: int = 0,
) -> dict[str, _Connection]:
    """Write one round; return what the database now holds for this worker."""
    result = _write(row, wanted, written, lease=lease, patterns=patterns, cursor=cursor)
    # The write is committed: a failure here must not make the caller write it again.
    try:
        expired = expire_workers(None, patterns=patterns)
    except DatabaseError as exc:
        logger.warning("presence: cannot expire dead workers, will retry: %s", exc)
    else:
        if expired:
            logger.info("presence: expired %d worker(s) whose lease ran out", expired)
    return result


def _write(
    row: _WorkerRow,
    wanted: Mapping[str, _Connection],
    written: Mapping[str, _Connection],
    *,
    lease: float,
    patterns: tuple[str, ...],
    cursor: int = 0,
) -> dict[str, _Connection]:
    """Heartbeat, then turn ``written`` into ``wanted`` in the database, in one transaction."""
    workers = PresenceWorker.objects
    expires = ExpressionWrapper(Now() + Value(timedelta(seconds=lease)), output_field=DateTimeField())
    with transaction.atomic():
        # Locks this worker's row until commit: expire_workers() skips it meanwhile.
        if not workers.filter(pk=row.id).update(heartbeat_at=Now(), expires_at=expires, cursor=cursor):
            if written:
                logger.warning("presence: this worker's rows expired (heartbeats missed); writing them again")
            workers.create(
                id=row.id,
                hostname=row.hostname,
                pid=row.pid,
                started_at=row.started_at,
                heartbeat_at=Now(),
                expires_at=expires,
                cursor=cursor,
            )
            written = {}
        added = [c for key, c in wanted.items() if key not in written]
        gone = [key for key in written if key not in wanted]
        # Snapshots are immutable: an unchanged connection is the very same object.
        changed = [c for c in wanted.values() if written.get(c.id) is not c]
        subscribed = [(c, topic) for c in changed for topic in c.topics - written.get(c.id, _NONE).topics]
        left = [c for c in written.values() if wanted.get(c.id) is not c]
        unsubscribed = [(c, topic) for c in left for topic in c.topics - wanted.get(c.id, _NONE).topics]
        if not (added or gone or subscribed or unsubscribed):
            return dict(wanted)
        names = {
            (c.user_id, topic): c.username for c, topic in subscribed + unsubscribed if _announced(topic, patterns)
        }
        _lock(names)
        # Additions first: a user moving from one connection to another never "leaves".
        joining = {(c.user_id, topic) for c, topic in subscribed} & names.keys()
        present_before = _present(joining)
        PresenceConnection.objects.bulk_create(
            [
                PresenceConnection(
                    id=c.id,
                    worker_id=row.id,
                    user_id=c.user_id,
                    username=c.username,
                    client_ip=c.client_ip,
                    connected_at=datetime.fromtimestamp(c.connected_at, UTC),
                )
                for c in added
            ],
            ignore_conflicts=True,
        )
        PresenceSubscription.objects.bulk_create(
            [PresenceSubscription(connection_id=c.id, user_id=c.user_id, topic=topic) for c, topic in subscribed],
            ignore_conflicts=True,
        )
        doomed = Q(connection_id__in=gone) if gone else Q()
        for c, topic in unsubscribed:
            if c.id in wanted:
                doomed |= Q(connection_id=c.id, topic=topic)
        leaving: set[tuple[int, str]] = set()
        if doomed:
            rows = PresenceSubscription.objects.filter(doomed)
            # Only what this transaction really deletes can be a leave (a retried round deletes nothing twice).
            leaving = set(rows.values_list("user_id", "topic").distinct()) & names.keys()
            rows.delete()
        if gone:
            PresenceConnection.objects.filter(pk__in=gone).delete()
        present_after = _present(leaving)
        for user_id, topic in sorted(joining - present_before):
            _announce(PRESENCE_JOIN, user_id, names[user_id, topic], topic)
        for user_id, topic in sorted(leaving - present_after):
            _announce(PRESENCE_LEAVE, user_id, names[user_id, topic], topic)
    return dict(wanted)


def expire_workers(
    worker_ids: Iterable[str] | None = None,
    *,
    patterns: Iterable[str] | None = None,
) -> int:
    """Delete workers and their presence rows, announcing leaves; return how many were deleted (sync).

    Args:
        worker_ids: these workers (waiting for their row locks); None: every
            worker whose lease ran out (skipping rows another transaction holds).
        patterns: the ``PRESENCE_TOPICS`` patterns (default: the setting).
    """
    patterns = tuple(settings.PRESENCE_TOPICS if patterns is None else patterns)
    with transaction.atomic():
        workers = PresenceWorker.objects.all()
        if worker_ids is None:
            workers = workers.filter(expires_at__lt=Now()).select_for_update(skip_locked=True)
        else:
            workers = workers.filter(pk__in=list(worker_ids)).select_for_update()
        doomed = list(workers.values_list("pk", flat=True))
        if not doomed:
            return 0
        names: dict[tuple[int, str], str] = {}
        if patterns:
            rows = PresenceSubscription.objects.filter(connection__worker__in=doomed)
            for user_id, topic, username in rows.values_list("user_id", "topic", "connection__username").distinct():
                if _announced(topic, patterns):
                    names[user_id, topic] = username
        _lock(names)
        PresenceWorker.objects.filter(pk__in=doomed).delete()
        for user_id, topic in sorted(set(names) - _present(set(names))):
            _announce(PRESENCE_LEAVE, user_id, names[user_id, topic], topic)
    return len(doomed)


def _announced(topic: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(topic, pattern) for pattern in patterns)


def _lock(pairs: Iterable[tuple[int, str]]) -> None:
    """Take the advisory lock of each (user, topic) until commit, in one global order (no deadlocks)."""
    keys = sorted({_lock_key(user_id, topic) for user_id, topic in pairs})
    if keys:
        with connection.cursor() as cursor:
            # A plain function scan: the locks are taken in array order.
            cursor.execute("SELECT pg_advisory_xact_lock(key) FROM unnest(%s::bigint[]) AS key", [keys])


def _lock_key(user_id: int, topic: str) -> int:
    digest = hashlib.blake2b(f"realtime.presence\0{user_id}\0{topic}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _present(pairs: set[tuple[int, str]]) -> set[tuple[int, str]]:
    """Return the (user, topic) pairs of ``pairs`` that have a subscription row, on any worker."""
    if not pairs:
        return set()
    rows = PresenceSubscription.objects.filter(
        user_id__in={user_id for user_id, _ in pairs}, topic__in={topic for _, topic in pairs}
    )
    return set(rows.values_list("user_id", "topic").distinct()) & pairs


def _announce(event: str, user_id: int, username: str, topic: str) -> None:
    publish(event, {"user": {"id": user_id, "username": username}, "topic": topic}, topic=topic)


def _ip_of(remote: str) -> str:
    """Return the IP address in ``remote`` ("1.2.3.4", "1.2.3.4:5678", "[::1]:5678" or "::1")."""
    candidates = [remote]
    if remote.startswith("["):
        candidates.append(remote[1:].split("]", 1)[0])
    elif remote.count(":") == 1:
        candidates.append(remote.split(":", 1)[0])
    for candidate in candidates:
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_address(candidate))
    return remote[:64]
