"""``manage.py realtime_prune``: delete outbox events older than the retention."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError

from realtime.conf import settings
from realtime.retention import prune


class Command(BaseCommand):
    help = "Delete realtime events older than REALTIME['RETENTION'] (workers also do this on their own)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--retention", type=int, default=None, help="Seconds to keep instead of REALTIME['RETENTION']."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        retention = options["retention"] if options["retention"] is not None else settings.RETENTION
        if retention < 0:
            raise CommandError("--retention must be zero or more seconds.")
        try:
            deleted = prune(retention)
        except DatabaseError as exc:
            raise CommandError(f"Cannot prune: {exc}") from None
        self.stdout.write(f"Pruned {deleted} event(s) older than {retention} s.")
