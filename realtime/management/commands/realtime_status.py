"""``manage.py realtime_status``: workers, connections, listener lag, outbox size."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError
from django.db.models import Count, Max, Min
from django.utils import timezone

from realtime.models import Event, PresenceConnection, PresenceWorker
from realtime.retention import horizon


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
    }


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
        outbox = status["outbox"]
        span = f"ids {outbox['first_id']}..{outbox['last_id']}" if outbox["events"] else "empty"
        self.stdout.write(
            f"Outbox: {outbox['events']} event(s), {span}, oldest {outbox['oldest_at'] or '-'}, "
            f"retention horizon {outbox['retention_horizon']}"
        )
