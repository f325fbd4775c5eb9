"""``manage.py runwebsockets [addr:port]``: run a websocket worker."""

from __future__ import annotations

import asyncio
import re
import signal
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.migrations.executor import MigrationExecutor
from django.db.utils import OperationalError

from realtime.server import Worker

DEFAULT_ADDRPORT = "127.0.0.1:8765"
ADDRPORT = re.compile(r"^(?:(?P<host>\[[0-9a-fA-F:.]+\]|[^:\[\]]+):)?(?P<port>\d+)$")


def parse_addrport(value: str) -> tuple[str, int]:
    """Parse ``8765``, ``0.0.0.0:8765`` or ``[::1]:8765``; raise CommandError otherwise."""
    match = ADDRPORT.match(value)
    if not match:
        raise CommandError(f'"{value}" is not a valid address:port (e.g. 127.0.0.1:8765 or [::1]:8765).')
    host = (match["host"] or "127.0.0.1").strip("[]")
    port = int(match["port"])
    if not 0 < port < 65536:
        raise CommandError(f"Port {port} is out of range (1-65535).")
    return host, port


class Command(BaseCommand):
    help = "Run a realtime websocket worker (default 127.0.0.1:8765)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("addrport", nargs="?", default=DEFAULT_ADDRPORT, help="Address and port to listen on.")

    def handle(self, *args: Any, **options: Any) -> None:
        host, port = parse_addrport(options["addrport"])
        self._check_database()
        self.stdout.write(f"Realtime websocket worker on ws://{_url_host(host)}:{port}/ (Ctrl-C to stop)")
        try:
            asyncio.run(self._main(host, port))
        except OSError as exc:
            raise CommandError(f"Cannot listen on {host}:{port}: {exc.strerror or exc}") from None

    async def _main(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
        await Worker().run(host, port, stop)

    def _check_database(self) -> None:
        connection = connections[DEFAULT_DB_ALIAS]
        try:
            executor = MigrationExecutor(connection)
            plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
        except OperationalError as exc:
            raise CommandError(f"Cannot reach the database: {str(exc).strip()}") from None
        finally:
            connection.close()
        if plan:
            raise CommandError("The database has unapplied migrations: run 'python manage.py migrate' first.")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
