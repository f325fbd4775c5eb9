"""Management commands and system checks: clear errors, never tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings

from realtime.checks import check_settings
from realtime.management.commands.runwebsockets import parse_addrport
from tests.helpers import BASE_DIR, database_url_for_tests


def manage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=BASE_DIR,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_e001_when_database_is_not_postgresql():
    """manage.py check reports realtime.E001 with a hint on a non-PostgreSQL database."""
    result = manage("check", DJANGO_SETTINGS_MODULE="tests.settings_sqlite")
    assert result.returncode == 1
    assert "realtime.E001" in result.stderr
    assert "needs PostgreSQL, but DATABASES['default'] is sqlite" in result.stderr
    assert "HINT: Set DATABASES['default']['ENGINE'] to 'django.db.backends.postgresql'" in result.stderr
    assert "DATABASE_URL" not in result.stderr  # a setting of this demo, not of the user's project
    assert "Traceback" not in result.stderr


def test_check_passes_on_postgresql():
    """The project's own configuration passes every check."""
    result = manage("check")
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


def test_e002_for_bad_settings():
    """Unknown keys and wrong types in REALTIME are reported, with the defaults kept meanwhile."""
    with override_settings(REALTIME={"TOKEN_MAX_AGE": "60", "NOPE": 1, "AUTH_TIMEOUT": 0}):
        messages = [m.msg for m in check_settings()]
    assert messages == [
        "Unknown REALTIME setting 'NOPE'.",
        "REALTIME['TOKEN_MAX_AGE'] must be a positive integer, not '60'.",
        "REALTIME['AUTH_TIMEOUT'] must be a positive number of seconds, not 0.",
    ]
    assert check_settings() == []  # override undone, settings reloaded
    with override_settings(REALTIME={"MESSAGE_BURST": 0, "ALLOWED_ORIGINS": ["^(unclosed"], "URL": "http://x/"}):
        messages = [m.msg for m in check_settings()]
    # In the order of the settings table.
    assert messages[0] == "REALTIME['URL'] must be None or a ws:// or wss:// URL, not 'http://x/'."
    assert messages[1].startswith("REALTIME['ALLOWED_ORIGINS'] pattern '^(unclosed' is not a regular expression")
    assert messages[2] == "REALTIME['MESSAGE_BURST'] must be a positive integer, not 0."


def test_w002_when_every_host_is_allowed_and_no_origins_are_set():
    """With ALLOWED_HOSTS = ['*'] and no ALLOWED_ORIGINS, the deploy check warns."""
    from realtime.checks import check_origins

    with override_settings(ALLOWED_HOSTS=["*"]):
        (warning,) = check_origins()
        assert warning.id == "realtime.W002"
        with override_settings(REALTIME={"ALLOWED_ORIGINS": ["https://example.com"]}):
            assert check_origins() == []


@pytest.mark.parametrize("backend", ["locmem.LocMemCache", "dummy.DummyCache"])
def test_e005_cache_sessions_on_a_per_process_cache(backend):
    """Cache sessions on a cache private to each process are an error: the worker could not see them."""
    from realtime.checks import check_session_engine

    caches = {"default": {"BACKEND": f"django.core.cache.backends.{backend}"}}
    with override_settings(SESSION_ENGINE="django.contrib.sessions.backends.cache", CACHES=caches):
        (error,) = check_session_engine()
    assert error.id == "realtime.E005"
    assert "private to each process" in error.msg
    shared = {"default": {"BACKEND": "django.core.cache.backends.db.DatabaseCache", "LOCATION": "cache"}}
    with override_settings(SESSION_ENGINE="django.contrib.sessions.backends.cache", CACHES=shared):
        assert check_session_engine() == []
    with override_settings(SESSION_ENGINE="django.contrib.sessions.backends.cached_db", CACHES=caches):
        assert check_session_engine() == []  # cached_db falls back to the database


def test_w003_when_the_admin_template_does_not_lead_to_realtime(tmp_path):
    """A site admin/base_site.html that extends admin/base.html gets a warning; one that extends base_site does not."""
    from django.conf import settings

    from realtime.checks import check_admin_template

    (tmp_path / "admin").mkdir()
    template = tmp_path / "admin" / "base_site.html"
    templates = [{**settings.TEMPLATES[0], "DIRS": [tmp_path]}]
    template.write_text('{% extends "admin/base.html" %}')
    with override_settings(TEMPLATES=templates):
        (warning,) = check_admin_template()
    assert warning.id == "realtime.W003"
    assert str(template) in warning.msg
    template.write_text('{% extends "admin/base_site.html" %}{% block title %}Mine{% endblock %}')
    with override_settings(TEMPLATES=templates):
        assert check_admin_template() == []
    include = '{% include "realtime/admin_toasts.html" %}'
    template.write_text(f'{{% extends "admin/base.html" %}}{{% block extrahead %}}{include}{{% endblock %}}')
    with override_settings(TEMPLATES=templates):
        assert check_admin_template() == []
    apps = [app for app in settings.INSTALLED_APPS if app != "realtime"] + ["realtime"]
    with override_settings(INSTALLED_APPS=apps, TEMPLATES=[{**settings.TEMPLATES[0], "DIRS": []}]):
        (warning,) = check_admin_template()
    assert "Put 'realtime' before 'django.contrib.admin'" in warning.hint


@pytest.mark.parametrize(
    ("value", "expected"),
    [("8765", ("127.0.0.1", 8765)), ("0.0.0.0:9000", ("0.0.0.0", 9000)), ("[::1]:8765", ("::1", 8765))],
)
def test_addrport_forms(value, expected):
    """runwebsockets takes port, host:port and [ipv6]:port."""
    assert parse_addrport(value) == expected


@pytest.mark.parametrize("value", ["localhost:", "::1:8765", "host:99999", "abc"])
def test_bad_addrport_is_a_command_error(value):
    """A bad address is a CommandError naming the value."""
    with pytest.raises(CommandError, match=r"valid address:port|out of range"):
        call_command("runwebsockets", value)


@pytest.mark.django_db
def test_runwebsockets_reports_a_busy_port():
    """A port already in use is a one-line error, not a traceback."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = manage("runwebsockets", f"127.0.0.1:{port}", DATABASE_URL=database_url_for_tests())
    assert result.returncode == 1
    assert f"CommandError: Cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.django_db
def test_runwebsockets_reload_restarts_on_code_change():
    """With --reload, touching a Python file of the app restarts the worker, which serves again."""
    import signal
    import time
    from pathlib import Path

    from tests.helpers import WorkerProcess, free_port

    port = free_port()
    log_path = Path(BASE_DIR / f".reload-test-{port}.log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "runwebsockets", f"127.0.0.1:{port}", "--reload"],
            cwd=BASE_DIR,
            env={**os.environ, "DATABASE_URL": database_url_for_tests()},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the reloader's child is in the same group: stop both
        )
    worker = WorkerProcess(process, port, log_path)
    try:

        def wait_ready() -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if worker.http("/readyz")[0] == 200:
                        return
                except OSError:
                    pass
                time.sleep(0.1)
            raise AssertionError(worker.log())

        wait_ready()
        source = BASE_DIR / "realtime" / "topics.py"
        time.sleep(1.5)  # the StatReloader compares modification times once a second
        os.utime(source)
        deadline = time.monotonic() + 30
        while "topics.py changed, reloading" not in worker.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "topics.py changed, reloading" in worker.log()
        wait_ready()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(15)
        log_path.unlink(missing_ok=True)


@pytest.mark.django_db(transaction=True)
def test_realtime_status_reports_workers_connections_lag_and_outbox(worker):
    """realtime_status shows the live worker with its connection, a listener lag of zero, and the outbox."""
    import io
    import json
    import time

    from realtime import publish
    from tests.helpers import get_token, logged_in, make_user, open_ws, receive_events

    alice = make_user("alice")
    ws, _ = open_ws(worker, get_token(logged_in(alice)))
    publish("counted", {}, users=[alice])
    receive_events(ws, 1)
    deadline = time.monotonic() + 15
    while True:  # presence is written every PRESENCE_INTERVAL (2 s)
        out = io.StringIO()
        call_command("realtime_status", "--json", stdout=out)
        status = json.loads(out.getvalue())
        if status["connections"] == 1 and status["workers"] and status["workers"][0]["lag_events"] == 0:
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    (live,) = status["workers"]
    assert live["pid"] == worker.process.pid
    assert live["connections"] == 1
    assert status["users_online"] == 1
    assert status["outbox"]["events"] >= 1
    text = io.StringIO()
    call_command("realtime_status", stdout=text)
    assert "Workers: 1 live" in text.getvalue()
    assert "Connections: 1 (1 user(s) online)" in text.getvalue()
    ws.close()


def test_e004_for_a_topic_policy_that_cannot_be_imported():
    """A TOPIC_POLICY that does not import, or is not callable, is a system check error."""
    from realtime.checks import check_topic_policy

    with override_settings(REALTIME={"TOPIC_POLICY": "tests.topic_policies.nope"}):
        (error,) = check_topic_policy()
    assert error.id == "realtime.E004"
    assert "REALTIME['TOPIC_POLICY'] = 'tests.topic_policies.nope' cannot be used" in error.msg
    with override_settings(REALTIME={"TOPIC_POLICY": "tests.topic_policies.members_only"}):
        assert check_topic_policy() == []


def _ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
@pytest.mark.django_db(transaction=True)
def test_runwebsockets_listens_on_ipv6():
    """runwebsockets [::1]:PORT serves websockets and health checks over IPv6."""
    import json
    import signal
    import time
    import urllib.request

    from websockets.sync.client import connect

    from tests.helpers import ORIGIN, free_port, get_token, logged_in, make_user

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "manage.py", "runwebsockets", f"[::1]:{port}"],
        cwd=BASE_DIR,
        env={**os.environ, "DATABASE_URL": database_url_for_tests()},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://[::1]:{port}/readyz", timeout=2) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "no answer on [::1]"
                time.sleep(0.1)
        with connect(f"ws://[::1]:{port}/", origin=ORIGIN) as ws:
            ws.send(json.dumps({"type": "auth", "token": get_token(logged_in(make_user("alice")))}))
            assert json.loads(ws.recv(10))["type"] == "welcome"
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=15)
    assert f"listening on [::1]:{port}" in output
    assert "[::1]" in output


def test_runwebsockets_logs_to_stderr_in_a_site_without_logging(transactional_db):
    """With no LOGGING for realtime, the worker's own lines reach stderr; a default limit is not a warning."""
    from tests.helpers import start_worker

    worker = start_worker(extra_env={"DJANGO_SETTINGS_MODULE": "tests.settings_bare"}, open_files=1024)
    try:
        log = worker.log()
        assert "INFO realtime.server worker (pid" in log
        assert "listening on 127.0.0.1:" in log
        assert "serving at most 596 connections" in log
        assert "WARNING" not in log
    finally:
        worker.stop()


def test_an_explicit_max_connections_over_the_open_files_limit_is_a_warning(transactional_db):
    """A MAX_CONNECTIONS the site chose, that the open-files limit cannot meet, is logged as a warning."""
    from tests.helpers import start_worker

    worker = start_worker(realtime={"MAX_CONNECTIONS": 5000}, open_files=1024)
    try:
        assert "MAX_CONNECTIONS is 5000, but this process may open only 1024 files" in worker.log()
    finally:
        worker.stop()
