"""A streaming replica of the bench's own PostgreSQL, for workload (g)'s ``--replica`` variant.

:func:`start_standby` copies the primary (a :class:`bench.soak.Postgres`) with
``pg_basebackup -R -X stream`` (pgserver's own binaries) into a directory of
the run and starts it as a hot standby on a loopback TCP port of its own (TCP
like the primary, so a worker's reads cost the replica what they cost the
primary) and a socket directory of its own. :meth:`Standby.stop` stops it
(immediate shutdown); the run removes its directory with the rest of its
files. As root, PostgreSQL runs as pgserver's system user, as the primary does.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psycopg.conninfo import make_conninfo

from bench.servers import free_port

__all__ = ["Standby", "start_standby"]


def _pg_bin() -> Path:
    import pgserver

    return Path(pgserver.__file__).resolve().parent / "pginstall" / "bin"


def _run(command: list[str], user: str | None, timeout: float) -> str:
    result = subprocess.run(command, user=user, capture_output=True, text=True, timeout=timeout, cwd="/")
    if result.returncode:
        raise RuntimeError(f"{' '.join(command[:2])} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result.stdout


@dataclass
class Standby:
    """A hot standby of the bench's primary: its directory, port and the system user it runs as."""

    root: Path
    port: int
    user: str | None
    max_connections: int

    @property
    def data(self) -> Path:
        return self.root / "data"

    def conninfo(self, dbname: str, application_name: str | None = "bench-replica") -> str:
        params = {"host": "127.0.0.1", "port": self.port, "user": "postgres", "dbname": dbname}
        if application_name:
            params["application_name"] = application_name
        return make_conninfo(**params)

    def postmaster(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def _pg_ctl(self, *args: str, timeout: float = 60) -> None:
        options = (
            f"-c port={self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{self.root / 'sockets'}'"
            f" -c hot_standby=on -c hot_standby_feedback=on -c logging_collector=off"
            f" -c max_connections={self.max_connections}"
        )
        command = [str(_pg_bin() / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "replica.log")]
        _run([*command, "-o", options, "-w", "-t", str(int(timeout)), *args], self.user, timeout + 10)

    def start(self) -> None:
        self._pg_ctl("start")

    def stop(self) -> None:
        """Stop the standby if it runs (immediate shutdown: the run is over)."""
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                self._pg_ctl("stop", "-m", "immediate")

    def wait_caught_up(self, primary_url: str, timeout: float = 60.0) -> None:
        """Wait until the standby has replayed everything the primary had written when called."""
        import psycopg

        with psycopg.connect(primary_url, autocommit=True) as primary:
            target: Any = primary.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]  # type: ignore[index]
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as standby:
            while True:
                row = standby.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", [target]).fetchone()
                if row and row[0]:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the replica did not reach {target} in {timeout:.0f}s")
                time.sleep(0.05)


def start_standby(pg: Any, root: Path, max_connections: int) -> Standby:
    """Copy ``pg`` (a running :class:`bench.soak.Postgres`) with ``pg_basebackup -R`` into ``root``; start it.

    The standby's ``max_connections`` must be at least the primary's (hot standby refuses less).
    """
    user = "pgserver" if os.geteuid() == 0 else None
    root.mkdir(parents=True)
    (root / "sockets").mkdir()
    if user is not None:
        entry = pwd.getpwnam(user)
        for path in (root, root / "sockets"):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    standby = Standby(root, free_port(), user, max_connections)
    command = [str(_pg_bin() / "pg_basebackup"), "-D", str(standby.data), "-R", "-X", "stream", "-c", "fast"]
    command += ["-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres"]
    _run(command, user, 300)
    try:
        standby.start()
    except BaseException:
        standby.stop()
        raise
    return standby
