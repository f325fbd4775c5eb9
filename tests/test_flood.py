"""Floods and malformed input at the edges of a connection: each is refused, bounded, and hurts no one else."""

from __future__ import annotations

import contextlib
import http.client
import json
import resource
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from django.core import signing
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from realtime import publish, tokens
from tests.helpers import (
    ORIGIN,
    WAIT,
    WorkerProcess,
    closed_code,
    get_token,
    logged_in,
    make_user,
    open_ws,
    proc_status,
    receive,
    receive_events,
    start_worker,
)
from tests.rawws import frame, raw_connect

pytestmark = pytest.mark.django_db(transaction=True)

PING = frame(b"p" * 125, opcode=0x9)  # the largest ping a client may send
PINGS_PER_WRITE = 1000


@contextlib.contextmanager
def running(**options) -> Iterator[WorkerProcess]:
    """A worker started with ``start_worker(**options)``, stopped (and its log removed) afterwards."""
    worker = start_worker(**options)
    try:
        yield worker
    finally:
        worker.stop()
        worker.log_path.unlink(missing_ok=True)


def wait_for_log(worker: WorkerProcess, text: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while text not in worker.log():
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in the worker log:\n{worker.log()[-3000:]}")
        time.sleep(0.05)


def assert_clean_log(worker: WorkerProcess) -> None:
    log = worker.log()
    assert "Traceback" not in log, log[-3000:]
    assert "connection handler failed" not in log, log[-3000:]


def flood_pings(sock: socket.socket, count: int, deadline: float) -> tuple[int, OSError | None]:
    """Send up to ``count`` pings, never reading; return how many were sent and the error that stopped it."""
    chunk = PING * PINGS_PER_WRITE
    sent = 0
    try:
        while sent < count and time.monotonic() < deadline:
            sock.sendall(chunk)
            sent += PINGS_PER_WRITE
    except OSError as exc:  # the worker closed or reset the socket: expected
        return sent, exc
    return sent, None


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads memory from /proc")
def test_ping_flood_before_authentication_is_closed_and_bounded(worker):
    """A non-reading ping flood before login is closed, the worker's memory stays bounded, others get events."""
    good_user = make_user("good")
    good, _ = open_ws(worker, get_token(logged_in(good_user)))
    publish("warmup", {}, users=[good_user])
    receive_events(good, 1)
    before = proc_status(worker.process.pid, "VmRSS")
    raw = raw_connect(worker.port, origin=ORIGIN, rcvbuf=4096)
    result: list[tuple[int, OSError | None]] = []
    started = time.monotonic()
    # 200,000 pings are 26 MB of pongs: a worker that answered them all would hold them in memory.
    flood = threading.Thread(target=lambda: result.append(flood_pings(raw, 200_000, started + 20)))
    flood.start()
    try:
        publish("meanwhile", {"n": 1}, users=[good_user])
        assert receive_events(good, 1)[0]["event"] == "meanwhile"
        flood.join(30)
        wait_for_log(worker, "closed 1008: too many pings or fragments")
        after = proc_status(worker.process.pid, "VmRSS")
    finally:
        flood.join(30)
        raw.close()
    sent, error = result[0]
    elapsed = time.monotonic() - started
    print(f"ping flood: {sent} pings sent in {elapsed:.1f} s ({error!r}); RSS {before} -> {after} KiB")
    assert after - before < 16 * 1024, (before, after)
    publish("after", {"n": 2}, users=[good_user])
    assert receive_events(good, 1)[0]["event"] == "after"
    assert worker.process.poll() is None
    assert_clean_log(worker)
    good.close()


def test_non_reader_past_max_buffer_is_aborted(transactional_db):
    """A peer whose unsent output (pongs) passes MAX_BUFFER because it never reads is aborted."""
    limits = {"MAX_BUFFER": 65536, "MESSAGE_BURST": 100_000, "MESSAGES_PER_MINUTE": 100_000}
    with running(realtime=limits) as worker:
        raw = raw_connect(worker.port, origin=ORIGIN, rcvbuf=4096)
        try:
            started = time.monotonic()
            sent, error = flood_pings(raw, 90_000, started + 20)
            wait_for_log(worker, "aborted: not reading")
            print(f"non-reader: aborted after {sent} pings, {time.monotonic() - started:.1f} s ({error!r})")
            # The worker reset the socket: the flood stopped on an error, long before its end.
            assert error is not None, sent
        finally:
            raw.close()
        assert worker.http("/readyz")[0] == 200
        assert_clean_log(worker)


def _half_request(port: int) -> socket.socket | None:
    sock = socket.socket()
    sock.settimeout(3)
    try:
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # no blank line: the request never ends
    except OSError:
        sock.close()
        return None
    return sock


def test_unfinished_handshakes_count_against_the_connection_limit(transactional_db):
    """1,000 sockets that never finish their request do not exhaust the worker's files: it stays healthy and serves."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (2048 if hard == resource.RLIM_INFINITY else min(2048, hard), hard))
    alice = make_user("alice")
    token = get_token(logged_in(alice))
    # 600 files: at most 172 connections, and sockets past 172 + 64 are reset at accept.
    with running(open_files=600) as worker:
        with ThreadPoolExecutor(32) as pool:
            sockets = [sock for sock in pool.map(_half_request, [worker.port] * 1000) if sock is not None]
        try:
            started = time.monotonic()
            # While the half-open sockets hold the margin, new sockets may be reset too; the worker
            # drops unfinished handshakes after its open timeout (10 s), so /readyz answers by then.
            status = None
            while time.monotonic() < started + 20:
                with contextlib.suppress(OSError, http.client.HTTPException):
                    status = worker.http("/readyz")[0]
                    if status == 200:
                        break
                time.sleep(0.2)
            print(f"{len(sockets)} half-open sockets; /readyz {status} after {time.monotonic() - started:.1f} s")
            assert status == 200
            log = worker.log()
            assert "out of system resource" not in log, log[-3000:]
            assert "Too many open files" not in log, log[-3000:]
        finally:
            for sock in sockets:
                sock.close()
        ws, welcome = open_ws(worker, token)
        assert welcome["user"]["id"] == alice.pk
        ws.close()
        assert_clean_log(worker)


def test_deeply_nested_json_closes_1008_without_traceback(worker):
    """A first message of 1100 nested arrays closes 1008 without traceback, 50 times in a row; later: bad_json."""

    def nested_first_message() -> int:
        with connect(worker.url, origin=ORIGIN, open_timeout=WAIT) as ws:
            ws.send("[" * 1100)
            return closed_code(ws)

    assert nested_first_message() == 1008
    assert_clean_log(worker)
    assert [nested_first_message() for _ in range(50)] == [1008] * 50
    ws, _ = open_ws(worker, get_token(logged_in(make_user("alice"))))
    ws.send("[" * 1100)
    assert receive(ws)["code"] == "bad_json"
    ws.close()
    assert worker.process.poll() is None
    assert_clean_log(worker)


def test_unprintable_topics_are_refused_and_the_connection_stays_usable(worker):
    """A topic with NUL or a lone surrogate gets a bad_topic error, and the connection keeps working."""
    ws, _ = open_ws(worker, get_token(logged_in(make_user("alice"))))
    for text in (
        json.dumps({"type": "subscribe", "topic": "x\u0000y"}),
        '{"type":"subscribe","topic":"\\ud800"}',  # the escape itself reaches the server
    ):
        ws.send(text)
        reply = receive(ws)
        assert reply["type"] == "error", (text, reply)
        assert reply["code"] == "bad_topic", (text, reply)
        ws.send(json.dumps({"type": "ping"}))
        assert receive(ws) == {"type": "pong"}
    ws.send(json.dumps({"type": "subscribe", "topic": "fine"}))
    assert receive(ws) == {"type": "subscribed", "topic": "fine"}
    ws.close()
    time.sleep(0.3)
    assert_clean_log(worker)


def test_a_connection_holds_at_most_100_topics(transactional_db):
    """The first 100 distinct topics are subscribed, the 101st is refused with too_many_topics until one is dropped."""
    with running(realtime={"MESSAGE_BURST": 1000, "MESSAGES_PER_MINUTE": 100_000}) as worker:
        ws, _ = open_ws(worker, get_token(logged_in(make_user("alice"))))
        for n in range(100):
            ws.send(json.dumps({"type": "subscribe", "topic": f"topic-{n}"}))
        assert [receive(ws) for _ in range(100)] == [{"type": "subscribed", "topic": f"topic-{n}"} for n in range(100)]
        ws.send(json.dumps({"type": "subscribe", "topic": "topic-100"}))
        refusal = receive(ws)
        assert refusal["type"] == "error", refusal
        assert refusal["code"] == "too_many_topics", refusal
        # Subscribing again to a topic held is no new topic; dropping one makes room.
        ws.send(json.dumps({"type": "subscribe", "topic": "topic-0"}))
        assert receive(ws) == {"type": "subscribed", "topic": "topic-0"}
        ws.send(json.dumps({"type": "unsubscribe", "topic": "topic-0"}))
        assert receive(ws) == {"type": "unsubscribed", "topic": "topic-0"}
        ws.send(json.dumps({"type": "subscribe", "topic": "topic-100"}))
        assert receive(ws) == {"type": "subscribed", "topic": "topic-100"}
        ws.close()
        assert_clean_log(worker)


def test_failed_logins_are_throttled_per_address(transactional_db):
    """After AUTH_FAILURES_PER_MINUTE refusals that cost a query, even a valid token from that address gets 1013."""
    alice = make_user("alice")
    web = logged_in(alice)
    valid = get_token(web)
    unknown = signing.dumps({"u": alice.pk, "n": secrets.token_urlsafe(18)}, salt=tokens.SALT)  # no such ticket
    forged = signing.dumps({"u": alice.pk, "n": secrets.token_urlsafe(18)}, salt=tokens.SALT, key="not-the-key")
    with running(realtime={"AUTH_FAILURES_PER_MINUTE": 5}) as worker:

        def login(token: str) -> ConnectionClosed:
            with connect(worker.url, origin=ORIGIN, open_timeout=WAIT) as ws:
                ws.send(json.dumps({"type": "auth", "token": token, "last_id": None}))
                with pytest.raises(ConnectionClosed) as info:
                    ws.recv(WAIT)
                assert info.value.rcvd is not None, "closed without a close frame"
                return info.value

        # Forged tokens cost no query: refused, but not counted (a neighbour's junk cannot lock us out).
        assert [login(forged).rcvd.code for _ in range(10)] == [4401] * 10
        assert [login(unknown).rcvd.code for _ in range(5)] == [4401] * 5  # each cost a query
        throttled = login(valid).rcvd
        assert throttled.code == 1013
        assert "too many failed authentications" in throttled.reason
        assert_clean_log(worker)


def test_per_user_cap_holds_while_the_topic_policy_is_slow(transactional_db):
    """Six concurrent logins of one user, each held 1 s by the topic policy: exactly two welcomed, four closed 1013."""
    alice = make_user("alice")
    web = logged_in(alice)
    login_tokens = [get_token(web) for _ in range(6)]
    options = {"TOPIC_POLICY": "tests.topic_policies.slow", "MAX_CONNECTIONS_PER_USER": 2}
    with running(realtime=options) as worker:
        barrier = threading.Barrier(6)
        results: list[str | int] = []
        done = threading.Event()

        def login(token: str) -> None:
            with connect(worker.url, origin=ORIGIN, open_timeout=WAIT) as ws:
                barrier.wait(WAIT)
                ws.send(json.dumps({"type": "auth", "token": token, "last_id": None, "topics": ["t"]}))
                try:
                    first = json.loads(ws.recv(WAIT))
                except ConnectionClosed as exc:
                    results.append(exc.rcvd.code if exc.rcvd else "no close frame")
                    return
                results.append(first["type"])
                done.wait(WAIT)  # stay connected until every login is decided

        threads = [threading.Thread(target=login, args=(token,)) for token in login_tokens]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 3 * WAIT
        while len(results) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        done.set()
        for thread in threads:
            thread.join(WAIT)
        assert sorted(results, key=str) == [1013, 1013, 1013, 1013, "welcome", "welcome"], results
        assert_clean_log(worker)


def test_throttle_keys_group_an_ipv6_clients_addresses():
    """Failed logins count per IPv4 address, per IPv6 /64 (a client may rotate through it), not for Unix peers."""
    from realtime.worker.handshake import throttle_key

    assert throttle_key("203.0.113.7") == "203.0.113.7"
    assert throttle_key("2001:db8:1:2::1") == throttle_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert throttle_key("2001:db8:1:3::1") != throttle_key("2001:db8:1:2::1")
    assert throttle_key("::ffff:203.0.113.7") == "203.0.113.7"
    assert throttle_key("unix") is None


def test_fragment_flood_before_authentication_is_closed(worker):
    """A first message split into thousands of empty fragments is closed 1008, without traceback."""
    raw = raw_connect(worker.port, origin=ORIGIN)
    try:
        with contextlib.suppress(OSError):
            raw.sendall(frame(b"{", opcode=0x1, fin=False) + frame(b"", opcode=0x0, fin=False) * 4096)
        wait_for_log(worker, "closed 1008: too many pings or fragments")
    finally:
        raw.close()
    assert_clean_log(worker)


def test_duplicate_forwarded_for_headers_are_read_as_one_list(worker):
    """Two X-Forwarded-For headers neither crash the handler nor stop the login."""
    token = get_token(logged_in(make_user("alice")))
    headers = [("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-For", "198.51.100.2")]
    with connect(worker.url, origin=ORIGIN, open_timeout=WAIT, additional_headers=headers) as ws:
        ws.send(json.dumps({"type": "auth", "token": token, "last_id": None}))
        assert json.loads(ws.recv(WAIT))["type"] == "welcome"
    assert_clean_log(worker)


def test_unfinished_handshakes_count_toward_the_503(transactional_db):
    """Past MAX_CONNECTIONS counting unfinished handshakes, a complete handshake gets 503."""
    with running(realtime={"MAX_CONNECTIONS": 20}) as worker:
        sockets = [sock for sock in (_half_request(worker.port) for _ in range(30)) if sock is not None]
        try:
            time.sleep(0.5)  # accepted and counted
            with pytest.raises(InvalidStatus) as info:
                connect(worker.url, origin=ORIGIN, open_timeout=WAIT).close()
            assert info.value.response.status_code == 503
        finally:
            for sock in sockets:
                sock.close()
        assert_clean_log(worker)
