"""``manage.py realtime_status``: workers, connections, listener lag, read replica lag, outbox size."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections
from django.db.models import Count, Max, Min
from django.utils import timezone

from realtime.conf import settings
from realtime.models import Event, PresenceConnection, PresenceWorker
from realtime.outbox import TABLE
from realtime.retention import horizon, reached_position


def collect_status() -> dict[str, Any]:
    """Return the status of the realtime system as seen from the database (sync)."""
    now = timezone.now()
    outbox = Event.objects.filter(position__isnull=False).aggregate(
        events=Count("id"), first=Min("position"), last=Max("position"), oldest=Min("created_at")
    )
    newest = outbox["last"] or 0
    workers = []
    live = PresenceWorker.objects.filter(expires_at__gt=now).annotate(connection_count=Count("connections"))
    for worker in live.order_by("hostname", "pid"):
        workers.append(
            {
                "id": worker.id,
                "host": worker.hostname,
                "pid": worker.pid,
                "started_at": worker.started_at.isoformat(),
                "heartbeat_age_s": round((now - worker.heartbeat_at).total_seconds(), 1),
                "connections": worker.connection_count,
                "cursor": worker.cursor,
                "lag_events": max(0, newest - worker.cursor),
            }
        )
    connections = PresenceConnection.objects.filter(worker__expires_at__gt=now)
    return {
        "workers": workers,
        "connections": connections.count(),
        "users_online": connections.values("user_id").distinct().count(),
        "outbox": {
            "events": outbox["events"],
            "first_id": outbox["first"],
            "last_id": outbox["last"],
            "oldest_at": outbox["oldest"].isoformat() if outbox["oldest"] else None,
            "retention_horizon": horizon(),
        },
        "replica": replica_status(settings.READ_DATABASE) if settings.READ_DATABASE else None,
    }


def replica_status(alias: str) -> dict[str, Any]:
    """Return how far the read replica ``alias`` is behind the primary, as the database sees it (sync).

    The replica is asked first, then the primary, so what the replica has
    shown is never ahead of what it is compared with. A replica that cannot
    be reached is reported, not raised.
    """
    status: dict[str, Any] = {"alias": alias}
    try:
        with connections[alias].cursor() as cursor:
            cursor.execute(
                "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text,"
                " CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END"
            )
            in_recovery, replay_lsn, paused = cursor.fetchone()
        reached = reached_position(alias)
    except DatabaseError as exc:
        status["error"] = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return status
    with connections[DEFAULT_DB_ALIAS].cursor() as cursor:
        cursor.execute(
            f"SELECT coalesce(max(position), 0), extract(epoch FROM now() - min(created_at) FILTER"
            f" (WHERE position > %s))::float8, CASE WHEN %s::pg_lsn IS NULL THEN NULL"
            f" ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn) END FROM {TABLE}",
            [reached, replay_lsn, replay_lsn],
        )
        newest, oldest_missing_age, wal_behind = cursor.fetchone()
    status.update(
        {
            "in_recovery": in_recovery,
            "replay_paused": paused,
            "reached_position": reached,
            "positions_behind": max(0, int(newest) - reached),
            # Publish time of the oldest event the replica lacks: an upper bound of its lag.
            "lag_s": round(oldest_missing_age, 1) if oldest_missing_age is not None else 0.0,
            "wal_bytes_behind": max(0, int(wal_behind)) if wal_behind is not None else None,
        }
    )
    return status


class Command(BaseCommand):
    help = "Show the realtime workers, their connections and listener lag, and the outbox size."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="Print machine-readable JSON.")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            status = collect_status()
        except DatabaseError as exc:
            raise CommandError(f"Cannot read the realtime tables: {exc}") from None
        if options["json"]:
            self.stdout.write(json.dumps(status, indent=2))
            return
        workers = status["workers"]
        self.stdout.write(f"Workers: {len(workers)} live")
        for w in workers:
            self.stdout.write(
                f"  {w['host']}/{w['pid']}  connections {w['connections']}  cursor {w['cursor']}  "
                f"lag {w['lag_events']} event(s)  heartbeat {w['heartbeat_age_s']}s ago  since {w['started_at']}"
            )
        self.stdout.write(f"Connections: {status['connections']} ({status['users_online']} user(s) online)")
        replica = status["replica"]
        if replica is not None:
            self.stdout.write(self._replica_line(replica))
        outbox = status["outbox"]
        span = f"ids {outbox['first_id']}..{outbox['last_id']}" if outbox["events"] else "empty"
        self.stdout.write(
            f"Outbox: {outbox['events']} event(s), {span}, oldest {outbox['oldest_at'] or '-'}, "
            f"retention horizon {outbox['retention_horizon']}"
        )

    def _replica_line(self, replica: dict[str, Any]) -> str:
        name = f"Read replica {replica['alias']!r}"
        if "error" in replica:
            return f"{name}: unreachable ({replica['error']})"
        if not replica["in_recovery"]:
            return f"{name}: not a standby (pg_is_in_recovery() is false): it is read as it is"
        state = "replay paused, " if replica["replay_paused"] else ""
        wal = replica["wal_bytes_behind"]
        return (
            f"{name}: {state}lag {replica['lag_s']}s, {replica['positions_behind']} position(s) behind "
            f"(at {replica['reached_position']}), WAL {'-' if wal is None else wal} byte(s) behind"
        )
