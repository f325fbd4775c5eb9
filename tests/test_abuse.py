"""Hundreds of misbehaving connections at once: the server stays up, a good client misses nothing."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from realtime import publish
from tests.helpers import (
    ORIGIN,
    get_token,
    logged_in,
    make_user,
    open_ws,
    proc_status,
    receive_events,
    start_worker,
)
from tests.rawws import frame, raw_connect, send_text

pytestmark = pytest.mark.django_db(transaction=True)

ABUSERS_PER_KIND = 80  # 4 kinds: 320 bad connections in parallel, bounded in count and time


def abuse_round(worker, web, good, good_user, mallory, sockets: list[socket.socket]) -> None:
    """320 bad connections in parallel while 200 events stream; the good client gets all of them."""
    tokens = [get_token(web) for _ in range(ABUSERS_PER_KIND * 2)]

    def garbage(n: int) -> None:
        with contextlib.suppress(OSError):
            sock = raw_connect(worker.port, origin=ORIGIN)
            sockets.append(sock)
            sock.sendall(os.urandom(512))  # not even websocket frames

    def flood(n: int) -> None:
        with contextlib.suppress(OSError):
            sock = raw_connect(worker.port, origin=ORIGIN)
            sockets.append(sock)
            send_text(sock, json.dumps({"type": "auth", "token": tokens[n], "last_id": None}))
            for _ in range(50):
                sock.sendall(frame(b'{"type": "ping"}'))

    def non_reader(n: int) -> None:
        with contextlib.suppress(OSError):
            sock = raw_connect(worker.port, origin=ORIGIN, rcvbuf=4096)
            sockets.append(sock)
            send_text(sock, json.dumps({"type": "auth", "token": tokens[ABUSERS_PER_KIND + n], "last_id": None}))

    def silent(n: int) -> None:
        with contextlib.suppress(OSError):
            sockets.append(raw_connect(worker.port, origin=ORIGIN))  # never authenticates

    threads = [
        threading.Thread(target=kind, args=(n,))
        for n in range(ABUSERS_PER_KIND)
        for kind in (garbage, flood, non_reader, silent)
    ]
    accepted = 'realtime_authentications_total{outcome="accepted"}'
    accepted_before = worker.metric(accepted)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    # Every round streams into the same crowd: all 80 non-readers in (and the floods, until their
    # 1008). Streaming while they still connect made a round's buffered peak, and with it the RSS the
    # allocator keeps, depend on the race, and a non-reader that came in after the stream held no
    # data, so nothing closed it before the keepalive did.
    deadline = time.monotonic() + 30
    while worker.metric(accepted) < accepted_before + 2 * ABUSERS_PER_KIND:
        assert time.monotonic() < deadline, "the abusers' authentications did not all complete"
        time.sleep(0.05)
    # Now events for everyone (the non-readers included), in 30 KB pieces.
    blob = "y" * 30_000
    for n in range(200):
        publish("stream", {"n": n, "blob": blob}, users=[good_user, mallory])
    events = receive_events(good, 200, timeout=60)
    assert [e["data"]["n"] for e in events] == list(range(200))
    assert worker.process.poll() is None, "the server is still up"
    # Everyone misbehaving is gone within the timeouts (auth 1 s, close 1 s after 1008/1013).
    deadline = time.monotonic() + 30
    metrics = ""
    while time.monotonic() < deadline:
        _, metrics = worker.http("/metrics")
        if "realtime_connections 1.0" in metrics:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"abusers still registered:\n{metrics}")
    for sock in sockets:
        sock.close()
    sockets.clear()
    time.sleep(3)  # let the last handlers finish


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads memory from /proc")
def test_abuse_in_parallel_hurts_no_one_else():
    """Garbage, floods, non-readers and silent clients in parallel: the good client gets every event, in order."""
    worker = start_worker(
        realtime={
            "AUTH_TIMEOUT": 1.0,
            # Generous keepalive: the good client must never be its victim on a busy machine.
            "PING_INTERVAL": 5.0,
            "PING_TIMEOUT": 20.0,
            "CLOSE_TIMEOUT": 1.0,
            "MESSAGE_BURST": 5,
            "MAX_BUFFER": 256 * 1024,
            "MAX_CONNECTIONS_PER_USER": 10_000,
        }
    )
    sockets: list[socket.socket] = []
    try:
        good_user = make_user("good")
        mallory = make_user("mallory")
        web = logged_in(mallory)
        good_web = logged_in(good_user)
        # It reads like a browser, all the time (max_queue=None): the test publishes 6 MB before it
        # looks at them, which a bounded queue would turn into a slow reader.
        good, _ = open_ws(worker, get_token(good_web), max_queue=None)
        # Warm up (the thread pool's threads each get their own malloc arena on first use),
        # then take the baseline.
        warm_tokens = [get_token(good_web) for _ in range(40)]
        warm = [threading.Thread(target=lambda t=t: open_ws(worker, t)[0].close()) for t in warm_tokens]
        for thread in warm:
            thread.start()
        for thread in warm:
            thread.join(30)
        publish("warmup", {"blob": "w" * 30_000}, users=[good_user])
        receive_events(good, 1)
        time.sleep(1)
        rss = [proc_status(worker.process.pid, "VmRSS")]
        for round_number in range(3):
            abuse_round(worker, web, good, good_user, mallory, sockets)
            rss.append(proc_status(worker.process.pid, "VmRSS"))
            print(f"round {round_number + 1}: worker RSS {rss[-1] / 1024:.1f} MiB (baseline {rss[0] / 1024:.1f} MiB)")
        # Memory comes back near the baseline (see realtime/memory.py), and a later round of the
        # same abuse does not grow it much more: nothing leaks per connection. The allocator's
        # one-time growth (about 30 MiB on Python 3.12) lands in round 1 or, now and then, in
        # round 2: the steady state is judged on round 3.
        assert rss[3] < rss[2] + 15 * 1024, rss
        assert max(rss[1:]) < rss[0] + 48 * 1024, rss
        log = worker.log()
        assert "Traceback" not in log
        assert "connection handler failed" not in log
        good.close()
    finally:
        for sock in sockets:
            sock.close()
        worker.stop()
