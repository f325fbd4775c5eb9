"""Retention: prune outbox rows older than ``REALTIME["RETENTION"]``.

Pruning deletes committed rows in small batches (``FOR UPDATE SKIP LOCKED``,
one short transaction each), so publishers and other workers pruning at the
same time never wait on it. Each batch raises the retention horizon, the
highest position pruned, in the same transaction: a client whose cursor is
below the horizon may have missed pruned events and receives ``reset``.
"""

from __future__ import annotations

from datetime import timedelta

from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.utils import timezone

from realtime.outbox import NEWEST_POSITION, TABLE

__all__ = ["REACHED_POSITION", "horizon", "prune", "reached_position"]

# How far a database (the primary, or a replica that may lag) has got: its newest
# position, or the retention horizon when higher (pruning may have removed the
# newest rows). Every position at or below it that still exists is visible.
# One statement, one snapshot.
REACHED_POSITION = (
    f"SELECT greatest(({NEWEST_POSITION}), (SELECT coalesce(max(position), 0) FROM realtime_retention_horizon))"
)


def prune(retention_seconds: int, *, batch_size: int = 5000, using: str = DEFAULT_DB_ALIAS) -> int:
    """Delete events older than ``retention_seconds`` and expired tickets; return the events deleted (sync)."""
    cutoff = timezone.now() - timedelta(seconds=retention_seconds)
    deleted = 0
    while True:
        with transaction.atomic(using=using), connections[using].cursor() as cursor:
            cursor.execute(
                f"""
                WITH doomed AS (
                    SELECT id FROM {TABLE}
                    WHERE created_at < %s AND position IS NOT NULL
                    ORDER BY position LIMIT %s FOR UPDATE SKIP LOCKED
                ), gone AS (
                    DELETE FROM {TABLE} e USING doomed WHERE e.id = doomed.id RETURNING e.position
                )
                SELECT count(*), max(position) FROM gone
                """,
                [cutoff, batch_size],
            )
            count, highest = cursor.fetchone()
            if highest is not None:
                cursor.execute(
                    "INSERT INTO realtime_retention_horizon (id, position) VALUES (1, %s) "
                    "ON CONFLICT (id) DO UPDATE SET position = greatest(realtime_retention_horizon.position, "
                    "EXCLUDED.position)",
                    [highest],
                )
        deleted += count
        if count < batch_size:
            break
    with connections[using].cursor() as cursor:
        cursor.execute("DELETE FROM realtime_ticket WHERE expires_at < now()")
    return int(deleted)


def horizon(using: str = DEFAULT_DB_ALIAS) -> int:
    """Return the highest pruned position (0 if nothing was pruned) (sync)."""
    with connections[using].cursor() as cursor:
        cursor.execute("SELECT coalesce(max(position), 0) FROM realtime_retention_horizon")
        return int(cursor.fetchone()[0])


def reached_position(using: str = DEFAULT_DB_ALIAS) -> int:
    """Return how far ``using`` has got: its newest position or its retention horizon, whichever is higher (sync).

    On a streaming replica, which shows commits in the primary's commit
    order, a later query sees every event at or below this position that
    still exists.
    """
    with connections[using].cursor() as cursor:
        cursor.execute(REACHED_POSITION)
        return int(cursor.fetchone()[0])
