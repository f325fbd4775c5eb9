"""Behind PgBouncer in transaction mode: everything but LISTEN goes through the pooler, and all works.

Django (publishing, tokens), the worker's login pool and its ORM threads reach
PostgreSQL through PgBouncer (Debian's ``pgbouncer``, transaction pooling); the
listener connects directly, as ``REALTIME["LISTEN_DATABASE"]`` says.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.helpers import (
    BASE_DIR,
    closed_code,
    database_url_for_tests,
    free_port,
    get_token,
    logged_in,
    make_user,
    open_ws,
    receive_events,
    start_worker,
)

pytestmark = pytest.mark.django_db(transaction=True)

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


@pytest.fixture
def pgbouncer() -> Iterator[tuple[str, int]]:
    """PgBouncer in transaction mode on a free loopback port, in front of the test database; yields (url, port)."""
    if not Path(PGBOUNCER).exists():
        if os.environ.get("REALTIME_REQUIRE_PGBOUNCER"):
            pytest.fail("pgbouncer is required here (apt-get install pgbouncer)")
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
    direct = conninfo_to_dict(database_url_for_tests())
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="realtime-pgbouncer-"))
    (workdir / "users.txt").write_text(f'"{direct.get("user", "postgres")}" ""\n')
    (workdir / "pgbouncer.ini").write_text(
        f"""[databases]
* = host={direct.get("host", "127.0.0.1")} port={direct.get("port", 5432)}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {workdir}/users.txt
pool_mode = transaction
max_client_conn = 500
default_pool_size = 20
admin_users = {direct.get("user", "postgres")}
ignore_startup_parameters = extra_float_digits
logfile = {workdir}/pgbouncer.log
pidfile = {workdir}/pgbouncer.pid
"""
    )
    args = [PGBOUNCER, str(workdir / "pgbouncer.ini")]
    if os.geteuid() == 0:  # PgBouncer refuses to run as root
        user = "pgserver" if _user_exists("pgserver") else "nobody"
        shutil.chown(workdir, user)
        for path in workdir.iterdir():
            shutil.chown(path, user)
        args += ["-u", user]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert process.poll() is None, (workdir / "pgbouncer.log").read_text()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert time.monotonic() < deadline, "pgbouncer did not start"
            time.sleep(0.05)
        url = make_conninfo(host="127.0.0.1", port=port, dbname=direct["dbname"], user=direct.get("user", "postgres"))
        yield url, port
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def shell(code: str, database_url: str) -> None:
    """Run ``code`` in ``manage.py shell`` with the demo settings for PgBouncer, against ``database_url``."""
    env = {**os.environ, "DATABASE_URL": database_url, "DJANGO_SETTINGS_MODULE": "tests.pgbouncer_settings"}
    result = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code], cwd=BASE_DIR, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def pgbouncer_clients(port: int) -> str:
    """PgBouncer's SHOW CLIENTS, from its admin console (simple query protocol: psql)."""
    user = conninfo_to_dict(database_url_for_tests()).get("user", "postgres")
    args = ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", user, "-d", "pgbouncer", "-At", "-c", "SHOW CLIENTS"]
    return subprocess.run(args, capture_output=True, text=True, check=True, timeout=10).stdout


def test_everything_but_listen_through_pgbouncer_in_transaction_mode(pgbouncer):
    """Logins, publishing, replay and a rights re-check work through PgBouncer; only the listener connects directly."""
    bouncer_url, bouncer_port = pgbouncer
    overrides = json.dumps({"LISTEN_DATABASE": database_url_for_tests()})
    worker = start_worker(
        extra_env={
            "DATABASE_URL": bouncer_url,
            "DJANGO_SETTINGS_MODULE": "tests.pgbouncer_settings",
            "REALTIME_TEST_OVERRIDES": overrides,
        }
    )
    try:
        alice = make_user("alice")
        web = logged_in(alice)

        # 48 logins, 16 at a time: several pool connections each past psycopg's prepare threshold,
        # their transactions spread over PgBouncer's server connections.
        def login(token: str) -> str:
            other, welcome = open_ws(worker, token)
            other.close()
            return welcome["type"]

        tokens = [get_token(web) for _ in range(48)]
        with ThreadPoolExecutor(16) as logins:
            assert list(logins.map(login, tokens)) == ["welcome"] * 48
        ws, _ = open_ws(worker, get_token(web))
        shell(
            "from django.db import transaction\n"
            "from realtime import publish, publish_many\n"
            f"for n in range(5): publish('via-pgbouncer', {{'n': n}}, users=[{alice.pk}])\n"
            "with transaction.atomic():\n"
            f"    publish_many({{'event': 'via-pgbouncer', 'data': {{'n': n}}, 'users': [{alice.pk}]}}"
            " for n in (5, 6))\n",
            bouncer_url,
        )
        events = receive_events(ws, 7)
        assert [e["data"]["n"] for e in events] == list(range(7))
        # Replay through the worker's ORM threads, which go through PgBouncer.
        replay, _ = open_ws(worker, get_token(web), last_id=events[0]["id"])
        assert [e["data"]["n"] for e in receive_events(replay, 6)] == list(range(1, 7))
        clients = pgbouncer_clients(bouncer_port)
        assert "realtime-auth" in clients, clients
        assert "realtime-listener" not in clients, clients
        # A rights change made through PgBouncer is re-checked through it: the sockets close 4401.
        shell(
            f"from django.contrib.auth.models import User\nuser = User.objects.get(pk={alice.pk})\n"
            "user.is_active = False\nuser.save()",
            bouncer_url,
        )
        assert closed_code(ws) == 4401
        assert closed_code(replay) == 4401
        assert "Traceback" not in worker.log()
    finally:
        worker.stop()
