"""The web side's database connections are bounded: bursts of token requests never exhaust PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import BASE_DIR, database_url_for_tests, free_port, logged_in, make_user

pytestmark = pytest.mark.django_db(transaction=True)

REQUESTS, CLIENTS = 1000, 16


@contextlib.contextmanager
def web_server(kind: str) -> Iterator[str]:
    """The demo project under the development server or gunicorn, on a free loopback port."""
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url_for_tests(), "DJANGO_SETTINGS_MODULE": "project.settings"}
    if kind == "runserver":
        args = [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"]
    else:  # as docs/deployment.md runs it
        args = [sys.executable, "-m", "gunicorn", "project.wsgi", "-b", f"127.0.0.1:{port}", "-w", "4"]
    server = subprocess.Popen(args, cwd=BASE_DIR, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, server.stderr.read().decode() if server.stderr else ""
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/admin/login/", timeout=2).close()
                break
            assert time.monotonic() < deadline, f"{kind} did not start"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(15)


@pytest.mark.parametrize("kind", ["runserver", "gunicorn"])
def test_a_thousand_token_requests_on_separate_connections_all_succeed(kind):
    """1,000 token requests from 16 parallel clients, each on its own HTTP connection, all answer 200."""
    sessionid = logged_in(make_user("alice")).cookies["sessionid"].value
    with web_server(kind) as base:

        def token(_: int) -> int:
            request = urllib.request.Request(f"{base}/realtime/token/", headers={"Cookie": f"sessionid={sessionid}"})
            try:
                with urllib.request.urlopen(request, timeout=30) as response:  # a new connection each time
                    return response.status
            except urllib.error.HTTPError as exc:
                return exc.code

        with ThreadPoolExecutor(CLIENTS) as clients:
            statuses = Counter(clients.map(token, range(REQUESTS)))
    assert statuses == {200: REQUESTS}
