"""``manage.py runwebsockets [addr:port]``: run a websocket worker."""

from __future__ import annotations

import re
import socket
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.migrations.executor import MigrationExecutor
from django.db.utils import OperationalError
from django.utils import autoreload

from realtime.conf import settings
from realtime.worker.handshake import format_host
from realtime.worker.limits import raise_open_files_limit
from realtime.worker.server import serve_forever
from realtime.worker.supervisor import run_workers

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
    help = "Run a realtime websocket worker (default 127.0.0.1:8765, or REALTIME['WS_PORT'])."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "addrport",
            nargs="?",
            default=None,
            help="Address and port to listen on (default 127.0.0.1 and REALTIME['WS_PORT'], 8765).",
        )
        parser.add_argument(
            "--workers",
            type=int,
            default=1,
            help="Number of worker processes sharing the port with SO_REUSEPORT (default 1).",
        )
        parser.add_argument(
            "--unix", metavar="PATH", default=None, help="Listen on this Unix socket (behind a reverse proxy) instead."
        )
        parser.add_argument(
            "--reload", action="store_true", help="Restart the worker when Python files change (development)."
        )
        parser.add_argument(
            "--keep-open",
            metavar="SECONDS",
            type=float,
            default=0.0,
            help="On SIGTERM/SIGINT, stop accepting but keep serving open connections this long (rolling deploys).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        host, port = parse_addrport(options["addrport"] or f"127.0.0.1:{settings.WS_PORT}")
        workers, unix_path, keep_open = options["workers"], options["unix"], options["keep_open"]
        if workers < 1:
            raise CommandError("--workers must be at least 1.")
        if keep_open < 0:
            raise CommandError("--keep-open must be zero or more seconds.")
        if workers > 1 and options["reload"]:
            raise CommandError("--reload runs a single worker; drop --workers.")
        if workers > 1 and unix_path:
            raise CommandError("--workers cannot share a Unix socket; run one worker per socket path.")
        if workers > 1 and not hasattr(socket, "SO_REUSEPORT"):
            raise CommandError("--workers needs SO_REUSEPORT, which this platform lacks; run one worker per port.")
        self._check_database()
        raise_open_files_limit()
        where = f"unix:{unix_path}" if unix_path else f"ws://{format_host(host)}:{port}/"
        self.stdout.write(
            f"Realtime websocket {'worker' if workers == 1 else f'{workers} workers'} on {where} (Ctrl-C to stop)"
        )
        if workers > 1:
            if run_workers(host, port, workers, keep_open=keep_open) != 0:
                raise CommandError("A worker failed to start; see the log above.")
            return
        if options["reload"]:
            # Like runserver: a parent process restarts this one when a file changes.
            autoreload.run_with_reloader(self._serve, host, port, unix_path, keep_open)
        else:
            self._serve(host, port, unix_path, keep_open)

    def _serve(self, host: str, port: int, unix_path: str | None, keep_open: float) -> None:
        try:
            serve_forever(host, port, unix_path=unix_path, keep_open=keep_open)
        except OSError as exc:
            raise CommandError(f"Cannot listen on {unix_path or f'{host}:{port}'}: {exc.strerror or exc}") from None

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
