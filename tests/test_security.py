"""Hostile and broken clients: each defence answers with a defined code and hurts no one else."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
import urllib.request

import pytest
from django.contrib.sessions.models import Session
from django.db import connection
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect, unix_connect

from realtime import publish
from tests.helpers import (
    ORIGIN,
    WAIT,
    assert_nothing_more,
    closed_code,
    get_token,
    logged_in,
    make_user,
    open_ws,
    receive,
    receive_events,
    start_worker,
)
from tests.rawws import raw_connect, send_text

pytestmark = pytest.mark.django_db(transaction=True)


def auth(ws, token: str) -> dict:
    ws.send(json.dumps({"type": "auth", "token": token, "last_id": None}))
    return receive(ws)


@pytest.fixture
def strict_worker(transactional_db):
    worker = start_worker(
        realtime={
            "MESSAGE_BURST": 5,
            "MESSAGES_PER_MINUTE": 60,
            "MAX_CONNECTIONS_PER_USER": 2,
            "PING_INTERVAL": 1.0,
            "PING_TIMEOUT": 3.0,
            "CLOSE_TIMEOUT": 0.5,
            "REVALIDATE_INTERVAL": 0.5,
        }
    )
    yield worker
    worker.stop()


@pytest.mark.parametrize("origin", ["https://evil.example", None])
def test_foreign_or_missing_origin_gets_403(worker, origin):
    """Cross-site websocket hijacking: a page from another origin, or no Origin, is refused at the handshake."""
    with pytest.raises(InvalidStatus) as info:
        connect(worker.url, origin=origin, open_timeout=WAIT).close()
    assert info.value.response.status_code == 403


def test_allowed_origins_setting_may_accept_scripts(transactional_db):
    """ALLOWED_ORIGINS with None accepts clients that send no Origin; other origins stay refused."""
    worker = start_worker(realtime={"ALLOWED_ORIGINS": [None, "https://app.example"]})
    try:
        alice = make_user("alice")
        with connect(worker.url) as ws:
            assert auth(ws, get_token(logged_in(alice)))["type"] == "welcome"
        with connect(worker.url, origin="https://app.example") as ws:
            assert auth(ws, get_token(logged_in(alice)))["type"] == "welcome"
        with pytest.raises(InvalidStatus):
            connect(worker.url, origin=ORIGIN).close()
    finally:
        worker.stop()


def test_message_flood_closes_1008_and_others_are_unaffected(strict_worker):
    """A client over its message rate is closed with 1008; another client keeps receiving."""
    alice, bob = make_user("alice"), make_user("bob")
    flooder, _ = open_ws(strict_worker, get_token(logged_in(alice)))
    bystander, _ = open_ws(strict_worker, get_token(logged_in(bob)))
    for _ in range(20):
        try:
            flooder.send(json.dumps({"type": "ping"}))
        except ConnectionClosed:
            break
    assert closed_code(flooder) == 1008
    publish("still-fine", {}, users=[bob])
    assert receive_events(bystander, 1)[0]["event"] == "still-fine"
    bystander.close()


def test_per_user_connection_cap_closes_1013(strict_worker):
    """The third connection of a user over a cap of two is refused with 1013."""
    alice = make_user("alice")
    web = logged_in(alice)
    first, _ = open_ws(strict_worker, get_token(web))
    second, _ = open_ws(strict_worker, get_token(web))
    with connect(strict_worker.url, origin=ORIGIN) as third:
        third.send(json.dumps({"type": "auth", "token": get_token(web), "last_id": None}))
        assert closed_code(third) == 1013
    first.close()
    second.close()


def test_global_connection_cap_answers_503(transactional_db):
    """Past MAX_CONNECTIONS, the handshake gets HTTP 503."""
    worker = start_worker(realtime={"MAX_CONNECTIONS": 1})
    try:
        with connect(worker.url, origin=ORIGIN), pytest.raises(InvalidStatus) as info:
            connect(worker.url, origin=ORIGIN, open_timeout=WAIT).close()
        assert info.value.response.status_code == 503
    finally:
        worker.stop()


def test_open_files_limit_lowers_the_connection_cap(transactional_db):
    """A process allowed 600 files serves 172 connections (428 kept for the rest), then answers 503, and says so."""
    worker = start_worker(open_files=600)
    held = []
    try:
        assert "serving at most 172 connections" in worker.log()
        for _ in range(172):
            held.append(connect(worker.url, origin=ORIGIN, open_timeout=WAIT, legacy=True))
        with pytest.raises(InvalidStatus) as info:
            connect(worker.url, origin=ORIGIN, open_timeout=WAIT).close()
        assert info.value.response.status_code == 503
        assert worker.http("/readyz")[0] == 200  # still healthy: it refused, it did not run out
    finally:
        for ws in held:
            ws.close()
        worker.stop()


def test_oversized_message_closes_1009(worker):
    """A message over MAX_MESSAGE_SIZE closes with 1009."""
    ws, _ = open_ws(worker, get_token(logged_in(make_user("alice"))))
    ws.send("x" * 70_000)
    assert closed_code(ws) == 1009


def test_compression_bomb_closes_1009(transactional_db):
    """With compression on, a message that inflates past MAX_MESSAGE_SIZE closes with 1009."""
    worker = start_worker(realtime={"COMPRESSION": "deflate"})
    try:
        ws, _ = open_ws(worker, get_token(logged_in(make_user("alice"))))
        assert ws.protocol.extensions, "permessage-deflate was negotiated"
        ws.send("0" * 5_000_000)  # deflates to a few KB on the wire
        assert closed_code(ws) == 1009
    finally:
        worker.stop()


def test_bad_input_gets_defined_answers_and_no_traceback(worker):
    """Invalid JSON, wrong types, unknown types and binary frames each get a defined answer; the log stays clean."""
    alice = make_user("alice")
    ws, _ = open_ws(worker, get_token(logged_in(alice)))
    for message, code in [("{", "bad_json"), ("[]", "bad_message"), ('{"type": 3}', "unknown_type")]:
        ws.send(message)
        assert receive(ws)["code"] == code
    ws.send(json.dumps({"type": "subscribe", "topic": ["not", "a", "string"]}))
    assert receive(ws)["code"] == "bad_topic"
    ws.send(b"\x00\x01binary")
    assert closed_code(ws) == 1008
    # A frame that breaks the websocket protocol itself (unmasked client frame).
    raw = raw_connect(worker.port, origin=ORIGIN)
    raw.sendall(b"\x81\x05hello")
    raw.settimeout(WAIT)
    assert raw.recv(1024)[:1] == b"\x88"  # a close frame
    raw.close()
    time.sleep(0.3)
    log = worker.log()
    assert "Traceback" not in log
    assert "connection handler failed" not in log
    _, metrics = worker.http("/metrics")
    assert "realtime_connections 0.0" in metrics


def test_half_open_client_is_dropped_by_keepalive(strict_worker):
    """A client that stops answering (never reads, never pongs) is closed within PING_INTERVAL + PING_TIMEOUT."""
    alice = make_user("alice")
    raw = raw_connect(strict_worker.port, origin=ORIGIN)
    send_text(raw, json.dumps({"type": "auth", "token": get_token(logged_in(alice)), "last_id": None}))
    deadline = time.monotonic() + 2 * WAIT
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if "realtime_connections 1.0" in strict_worker.http("/metrics")[1]:
            break
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if "realtime_connections 0.0" in strict_worker.http("/metrics")[1]:
            break
    else:
        raise AssertionError("the half-open connection was never dropped")
    raw.close()


def test_session_deleted_closes_its_sockets_4401(worker):
    """Deleting the session (e.g. in the admin or clearsessions) closes its sockets with 4401."""
    alice = make_user("alice")
    web = logged_in(alice)
    ws, _ = open_ws(worker, get_token(web))
    Session.objects.get(session_key=web.session.session_key).delete()
    assert closed_code(ws) == 4401


def test_session_deleted_by_raw_sql_is_caught_by_revalidation(strict_worker):
    """Even without signals, the periodic re-validation closes a connection whose session is gone."""
    alice = make_user("alice")
    web = logged_in(alice)
    ws, _ = open_ws(strict_worker, get_token(web))
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM django_session WHERE session_key = %s", [web.session.session_key])
    assert closed_code(ws) == 4401


def test_deleted_user_is_disconnected(worker):
    """Deleting a user closes their sockets with 4401."""
    alice = make_user("alice")
    ws, _ = open_ws(worker, get_token(logged_in(alice)))
    alice.delete()
    assert closed_code(ws) == 4401


def test_tokens_and_session_keys_never_reach_the_log(worker):
    """Neither the token nor the session key appears in the worker's log, even on failures."""
    alice = make_user("alice")
    web = logged_in(alice)
    token = get_token(web)
    ws, _ = open_ws(worker, token)
    ws.close()
    with connect(worker.url, origin=ORIGIN) as replay:
        replay.send(json.dumps({"type": "auth", "token": token}))
        assert closed_code(replay) == 4401
    log = worker.log()
    assert token not in log
    assert token.split(":")[0] not in log
    assert web.session.session_key not in log
    assert "closed 4401: authentication failed (token unknown or already used)" in log


def test_client_ip_from_trusted_proxy_only(transactional_db):
    """X-Forwarded-For is believed only from TRUSTED_PROXIES; otherwise the peer address is logged."""
    alice = make_user("alice")
    for proxies, expected in ([], "127.0.0.1"), (["127.0.0.0/8"], "203.0.113.7"):
        worker = start_worker(realtime={"TRUSTED_PROXIES": proxies})
        try:
            with connect(
                worker.url, origin=ORIGIN, additional_headers={"X-Forwarded-For": "198.51.100.1, 203.0.113.7"}
            ) as ws:
                assert auth(ws, get_token(logged_in(alice)))["type"] == "welcome"
        finally:
            worker.stop()
        assert f"{expected} authenticated as user {alice.pk}" in worker.log()


def test_unix_socket_and_server_header(transactional_db):
    """--unix serves on a socket path (behind a proxy, whose X-Forwarded-For is used); SERVER_HEADER is sent."""
    alice = make_user("alice")
    path = os.path.join(tempfile.mkdtemp(), "ws.sock")
    tcp = start_worker(realtime={"SERVER_HEADER": "edge"})
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{tcp.port}/healthz") as response:
            assert response.headers["Server"] == "edge"
    finally:
        tcp.stop()
    import subprocess
    import sys

    from tests.helpers import BASE_DIR, database_url_for_tests

    process = subprocess.Popen(
        [sys.executable, "manage.py", "runwebsockets", "--unix", path],
        cwd=BASE_DIR,
        env={**os.environ, "DATABASE_URL": database_url_for_tests()},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        with unix_connect(
            path, "ws://localhost/", origin=ORIGIN, additional_headers={"X-Forwarded-For": "203.0.113.9"}
        ) as ws:
            assert auth(ws, get_token(logged_in(alice)))["type"] == "welcome"
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=15)
    assert process.returncode == 0
    assert f"203.0.113.9 authenticated as user {alice.pk}" in output


def test_keep_open_serves_existing_connections_after_sigterm(transactional_db):
    """With --keep-open, SIGTERM refuses new connections but keeps delivering to open ones until they leave."""
    alice = make_user("alice")
    worker = start_worker(args=("--keep-open", "30"))
    ws, _ = open_ws(worker, get_token(logged_in(alice)))
    worker.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:  # wait until the listening socket is closed
        try:
            connect(worker.url, origin=ORIGIN, open_timeout=1).close()
        except (OSError, InvalidStatus):  # refused, or caught mid-handshake (503)
            break
        time.sleep(0.1)
    else:
        raise AssertionError("new connections are still accepted")
    publish("during-drain", {}, users=[alice])
    assert receive_events(ws, 1)[0]["event"] == "during-drain"
    assert worker.process.poll() is None
    ws.close()
    assert worker.process.wait(WAIT) == 0


def test_refused_subscription_does_not_leak_events(transactional_db):
    """A user refused a topic, in the auth message or by subscribing, receives none of its events."""
    worker = start_worker(realtime={"TOPICS": {"room:*": "auth.view_user"}})
    try:
        alice = make_user("alice")
        ws, _ = open_ws(worker, get_token(logged_in(alice)), topics=["room:1"])
        assert receive(ws) == {"type": "unsubscribed", "topic": "room:1"}  # refused at auth
        ws.send(json.dumps({"type": "subscribe", "topic": "room:1"}))
        assert receive(ws) == {
            "type": "error",
            "code": "forbidden",
            "message": "You may not subscribe to topic 'room:1'.",
            "topic": "room:1",
        }
        publish("secret", {}, topic="room:1")
        assert_nothing_more(ws, alice)
        ws.close()
    finally:
        worker.stop()
        worker.log_path.unlink(missing_ok=True)
