"""Test helpers: a real websocket worker process on a free loopback port, users, tokens, clients."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client as HttpClient
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from realtime import publish
from realtime.worker.db import listener_conninfo

BASE_DIR = Path(__file__).resolve().parent.parent
WAIT = 10.0  # generous bound on any wait for a message
# The demo site's origin: allowed by the worker (derived from ALLOWED_HOSTS).
ORIGIN = "http://127.0.0.1:8000"
# The event assert_nothing_more() publishes; numbered, so that each call waits for its own.
SENTINEL = "sentinel"
_sentinels = itertools.count(1)


def wait_until(condition: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    """Poll ``condition`` every 10 ms until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.01)


def proc_status(pid: int, field: str) -> int:
    """The number of ``field`` (``VmRSS`` in KiB, ``Threads``...) in ``/proc/<pid>/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def database_url_for_tests() -> str:
    """A libpq string for the test database pytest-django created (the same builder the listener uses)."""
    return listener_conninfo(application_name="realtime-tests")


@dataclass
class WorkerProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/"

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.port}{path}", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metric(self, sample: str) -> float:
        """The value of one sample of /metrics, named as it is printed (``name`` or ``name{label="value"}``)."""
        status, text = self.http("/metrics")
        assert status == 200, text
        match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
        assert match, f"{sample} not in /metrics"
        return float(match.group(1))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_worker(
    extra_env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
    port: int | None = None,
    realtime: dict[str, Any] | None = None,
    open_files: int | None = None,
    host: str = "127.0.0.1",
) -> WorkerProcess:
    """Start ``manage.py runwebsockets`` on a free port against the test database; wait until ready.

    ``realtime`` overrides keys of the worker's REALTIME setting; ``open_files``
    sets the worker's RLIMIT_NOFILE (soft and hard).
    """
    port = port or free_port()
    if realtime:
        extra_env = {
            **(extra_env or {}),
            "DJANGO_SETTINGS_MODULE": "tests.worker_settings",
            "REALTIME_TEST_OVERRIDES": json.dumps(realtime),
        }
    fd, log_name = tempfile.mkstemp(prefix="realtime-worker-", suffix=".log")
    env = {**os.environ, "DATABASE_URL": database_url_for_tests(), "REALTIME_LOG_LEVEL": "DEBUG", **(extra_env or {})}
    with os.fdopen(fd, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "runwebsockets", f"{host}:{port}", *args],
            cwd=BASE_DIR,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=None if open_files is None else lambda: _limit_open_files(open_files),
        )
    worker = WorkerProcess(process, port, Path(log_name), host)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"worker exited with {process.returncode}:\n{worker.log()}")
        try:
            if worker.http("/readyz")[0] == 200:
                return worker
        except OSError:
            pass
        time.sleep(0.05)
    worker.stop(signal.SIGKILL)
    raise RuntimeError(f"worker not ready in 30 s:\n{worker.log()}")


def _limit_open_files(limit: int) -> None:  # in the child, before exec
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


def make_user(username: str, *, staff: bool = False, superuser: bool = False, perms: tuple[str, ...] = ()) -> Any:
    from django.contrib.auth.models import Permission

    User = get_user_model()
    user = User.objects.create_user(username, password="pw-" + username, is_staff=staff, is_superuser=superuser)
    for perm in perms:
        app_label, codename = perm.split(".")
        user.user_permissions.add(Permission.objects.get(content_type__app_label=app_label, codename=codename))
    return user


def logged_in(user: Any) -> HttpClient:
    client = HttpClient()
    client.force_login(user)
    return client


def get_token(client: HttpClient) -> str:
    response = client.get("/realtime/token/")
    assert response.status_code == 200, response.content
    return response.json()["token"]


def open_ws(
    worker: WorkerProcess,
    token: str,
    last_id: int | None = None,
    topics: list[str] | None = None,
    **options: Any,
) -> tuple[ClientConnection, dict[str, Any]]:
    """Connect and authenticate; return the connection and the welcome message (``options`` go to connect())."""
    options = {"open_timeout": WAIT, "max_size": None, "legacy": True, "origin": ORIGIN, **options}
    ws = connect(worker.url, **options)
    auth: dict[str, Any] = {"type": "auth", "token": token, "last_id": last_id}
    if topics:
        auth["topics"] = topics
    ws.send(json.dumps(auth))
    welcome = json.loads(ws.recv(WAIT))
    assert welcome["type"] == "welcome", welcome
    return ws, welcome


def receive(ws: ClientConnection, timeout: float = WAIT) -> dict[str, Any]:
    return json.loads(ws.recv(timeout))


def receive_events(ws: ClientConnection, count: int, timeout: float = WAIT) -> list[dict[str, Any]]:
    """Receive ``count`` event messages (skipping other types) within ``timeout``."""
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(events) < count:
        message = json.loads(ws.recv(max(0.01, deadline - time.monotonic())))
        if message["type"] == "event":
            events.append(message)
    return events


def assert_nothing_more(ws: ClientConnection, user: Any, *, allow: Collection[str] = ()) -> None:
    """Assert that nothing committed so far is still to arrive on ``ws``.

    Publishes an event named ``sentinel`` to ``user`` (the user of ``ws``, or a pk),
    committed at once, then reads ``ws`` until that event arrives; any other
    message before it fails the test, except messages whose ``type`` is in
    ``allow``. Events reach a connection in commit order, so an unwanted event
    committed before this call would arrive first: the check needs no sleep.

    Must be called outside any atomic block, so that the sentinel commits now.
    Other connections of ``user`` receive the sentinel too.
    """
    assert not connection.in_atomic_block, "the sentinel must commit now: call outside transaction.atomic()"
    number = next(_sentinels)
    publish(SENTINEL, {"n": number}, users=[user])
    deadline = time.monotonic() + WAIT
    while True:
        try:
            message = json.loads(ws.recv(max(0.01, deadline - time.monotonic())))
        except TimeoutError:
            raise AssertionError(f"the sentinel did not arrive within {WAIT} s") from None
        except ConnectionClosed as exc:
            raise AssertionError(f"closed before the sentinel arrived: {exc}") from None
        if message["type"] == "event" and message["event"] == SENTINEL and message["data"] == {"n": number}:
            return
        if message["type"] not in allow:
            raise AssertionError(f"unexpected message before the sentinel: {message}")


def closed_code(ws: ClientConnection) -> int:
    """Read until the server closes ``ws``; return the close code it sent."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            ws.recv(WAIT)
    assert info.value.rcvd is not None, "closed without a close frame"
    return info.value.rcvd.code


@contextlib.contextmanager
def web_server(
    args: list[str], settings_module: str = "project.settings", extra_env: dict[str, str] | None = None
) -> Iterator[str]:
    """Run a web server for the demo project against the test database; yield its base URL.

    ``args`` is the command, with ``{port}`` standing for a free loopback port;
    it is ready once ``/admin/login/`` answers, and terminated afterwards.
    """
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url_for_tests(),
        "DJANGO_SETTINGS_MODULE": settings_module,
        **(extra_env or {}),
    }
    command = [arg.format(port=port) for arg in args]
    server = subprocess.Popen(command, cwd=BASE_DIR, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, server.stderr.read().decode() if server.stderr else ""
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{base}/admin/login/", timeout=2):
                break
            assert time.monotonic() < deadline, f"{command[:4]} did not start"
            time.sleep(0.1)
        yield base
    finally:
        server.terminate()
        server.wait(15)


def live_admin_state(response: Any) -> dict[str, Any] | None:
    """The live-admin state an admin page was rendered with (``realtime.live_admin.page_state()``), or None."""
    match = re.search(rb'<script id="realtime-admin-page" type="application/json">(.*?)</script>', response.content)
    return None if match is None else json.loads(match.group(1))
