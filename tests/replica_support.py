"""A real streaming replica of the test cluster, for tests of ``REALTIME["READ_DATABASE"]``.

:func:`start_replica` copies the cluster that holds the test database with
``pg_basebackup -R`` (pgserver's own binaries) into a temporary directory and
starts it as a hot standby on a socket directory and port of its own;
:meth:`Replica.destroy` stops it and removes the directory. As root, as
pgserver does, every PostgreSQL program runs as the system user ``pgserver``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.helpers import free_port


def pg_bin() -> Path:
    """pgserver's PostgreSQL binaries, whichever interpreter runs the tests."""
    import pgserver

    return Path(pgserver.__file__).resolve().parent / "pginstall" / "bin"


class ReplicaUnavailable(Exception):
    """pg_basebackup cannot copy the test cluster here (the reason says why)."""


@dataclass
class Replica:
    """A hot standby of the test cluster: its data directory, socket directory and port."""

    root: Path
    primary: str  # libpq string of the primary's test database
    port: int
    user: str | None  # the system user PostgreSQL runs as (None: this one)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sockets"

    def conninfo(self, application_name: str = "realtime-tests") -> str:
        """A libpq string for the test database on the replica."""
        params = {**conninfo_to_dict(self.primary), "host": str(self.socket_dir), "port": str(self.port)}
        params["application_name"] = application_name
        return make_conninfo(**params)

    def query(self, sql: str, params: Any = None) -> Any:
        """Run ``sql`` on the replica; return the first column of the first row."""
        with psycopg.connect(self.conninfo(), autocommit=True) as connection:
            row = connection.execute(sql, params).fetchone()
            return row[0] if row else None

    def pause(self) -> None:
        """Pause WAL replay and wait until it is paused: from here the replica shows nothing new."""
        self.query("SELECT pg_wal_replay_pause()")
        deadline = time.monotonic() + 10
        while self.query("SELECT pg_get_wal_replay_pause_state()") != "paused":
            assert time.monotonic() < deadline, "replay did not pause"
            time.sleep(0.01)

    def resume(self) -> None:
        self.query("SELECT pg_wal_replay_resume()")

    def wait_caught_up(self, timeout: float = 30.0) -> None:
        """Wait until the replica has replayed everything the primary had written when called."""
        with psycopg.connect(self.primary, autocommit=True) as primary:
            target = primary.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]  # type: ignore[index]
        deadline = time.monotonic() + timeout
        while not self.query("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", [target]):
            assert time.monotonic() < deadline, f"the replica did not reach {target} in {timeout}s"
            time.sleep(0.02)

    def pg_ctl(self, *args: str, timeout: float = 60) -> None:
        options = (
            f"-c port={self.port} -c listen_addresses='' -c unix_socket_directories='{self.socket_dir}'"
            " -c hot_standby=on -c hot_standby_feedback=on -c shared_buffers=16MB -c logging_collector=off"
        )
        _run([str(pg_bin() / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "replica.log"),
              "-o", options, "-w", "-t", str(int(timeout)), *args], self.user, timeout + 10)  # fmt: skip

    def start(self) -> None:
        self.pg_ctl("start")

    def stop(self) -> None:
        self.pg_ctl("stop", "-m", "fast")

    def restart(self) -> None:
        self.pg_ctl("restart", "-m", "fast")

    def log(self) -> str:
        path = self.root / "replica.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def destroy(self) -> None:
        """Stop the replica (if it runs) and delete its files."""
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.SubprocessError):
                self.pg_ctl("stop", "-m", "immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def django_settings_env(self, realtime: dict[str, Any] | None = None) -> dict[str, str]:
        """Environment for a worker (``start_worker(extra_env=...)``) that reads from this replica."""
        return {
            "DJANGO_SETTINGS_MODULE": "tests.replica_settings",
            "REALTIME_TEST_REPLICA_URL": self.conninfo("realtime-replica"),
            "REALTIME_TEST_OVERRIDES": json.dumps({"READ_DATABASE": "replica", **(realtime or {})}),
        }


def _run(command: list[str], user: str | None, timeout: float) -> str:
    result = subprocess.run(command, user=user, capture_output=True, text=True, timeout=timeout, cwd="/")
    if result.returncode:
        raise subprocess.CalledProcessError(result.returncode, command, result.stdout, result.stderr)
    return result.stdout


def start_replica(primary: str) -> Replica:
    """Copy the cluster of ``primary`` (a libpq string) with ``pg_basebackup -R`` and start it as a hot standby.

    Raises:
        ReplicaUnavailable: if pg_basebackup cannot run here, with its error.
    """
    user = "pgserver" if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="realtime-replica-"))
    replica = Replica(root, primary, free_port(), user)
    replica.socket_dir.mkdir()
    if user is not None:
        entry = pwd.getpwnam(user)
        for path in (root, replica.socket_dir):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    params = conninfo_to_dict(primary)
    command = [str(pg_bin() / "pg_basebackup"), "-D", str(replica.data), "-R", "-X", "stream", "-c", "fast"]
    for key, flag in (("host", "-h"), ("port", "-p"), ("user", "-U")):
        if params.get(key):
            command += [flag, str(params[key])]
    try:
        _run(command, user, 300)
    except (subprocess.CalledProcessError, OSError) as exc:
        shutil.rmtree(root, ignore_errors=True)
        reason = getattr(exc, "stderr", None) or str(exc)
        raise ReplicaUnavailable(f"pg_basebackup cannot copy the test cluster: {reason.strip()}") from None
    try:
        replica.start()
    except subprocess.CalledProcessError as exc:
        log = replica.log()
        replica.destroy()
        raise RuntimeError(f"the replica did not start: {exc.stderr}\n{log}") from None
    return replica
