"""apublish() and apublish_many() from async views under a real ASGI server (uvicorn)."""

from __future__ import annotations

import contextlib
import sys
import urllib.error
import urllib.request

import pytest

from tests.helpers import get_token, logged_in, make_user, open_ws, receive_events, web_server

pytestmark = pytest.mark.django_db(transaction=True)


def asgi_server() -> contextlib.AbstractContextManager[str]:
    """uvicorn serving the demo project plus tests/asgi_urls.py on a free loopback port."""
    uvicorn = [sys.executable, "-m", "uvicorn", "project.asgi:application", "--host", "127.0.0.1", "--port", "{port}"]
    return web_server(uvicorn, settings_module="tests.asgi_settings")


def call(url: str, sessionid: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=b"", headers={"Cookie": f"sessionid={sessionid}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_apublish_from_an_async_view_is_delivered(worker):
    """Events published with apublish() and apublish_many() in an async view reach the user, in order."""
    alice = make_user("alice")
    web = logged_in(alice)
    ws, _ = open_ws(worker, get_token(web))
    with asgi_server() as base:
        status, body = call(f"{base}/async/publish/", web.cookies["sessionid"].value)
        assert status == 200, body
    events = receive_events(ws, 3)
    assert [(e["event"], e["data"]["n"]) for e in events] == [("async.one", 0), ("async.many", 1), ("async.many", 2)]
    ws.close()


def test_atomic_publish_from_async_code_commits_or_rolls_back_with_the_change(worker):
    """A sync function under atomic(), awaited from an async view: rolled back, nothing is sent; committed, it is."""
    alice = make_user("alice")
    web = logged_in(alice)
    ws, _ = open_ws(worker, get_token(web))
    sessionid = web.cookies["sessionid"].value
    with asgi_server() as base:
        assert call(f"{base}/async/atomic/?fail=1", sessionid)[0] == 409
        assert call(f"{base}/async/atomic/", sessionid)[0] == 200
    (event,) = receive_events(ws, 1)
    assert event["event"] == "async.atomic" and event["data"] == {"fail": False}  # the rolled-back one never came
    ws.close()
