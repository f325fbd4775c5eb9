"""The web side's database connections are bounded: bursts of token requests never exhaust PostgreSQL."""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import logged_in, make_user, web_server

pytestmark = pytest.mark.django_db(transaction=True)

REQUESTS, CLIENTS = 1000, 16


SERVERS = {
    "runserver": [sys.executable, "manage.py", "runserver", "127.0.0.1:{port}", "--noreload"],
    # As docs/deployment.md runs it.
    "gunicorn": [sys.executable, "-m", "gunicorn", "project.wsgi", "-b", "127.0.0.1:{port}", "-w", "4"],
}


@pytest.mark.parametrize("kind", ["runserver", "gunicorn"])
def test_a_thousand_token_requests_on_separate_connections_all_succeed(kind):
    """1,000 token requests from 16 parallel clients, each on its own HTTP connection, all answer 200."""
    sessionid = logged_in(make_user("alice")).cookies["sessionid"].value
    with web_server(SERVERS[kind]) as base:

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
