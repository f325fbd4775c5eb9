"""Replays cost the worker little: bounded memory for clients that never read, no CPU for others' events."""

from __future__ import annotations

import json
import time

import psutil
import pytest
from django.db import transaction

from realtime import publish, publish_many
from tests.helpers import ORIGIN, get_token, logged_in, make_user, open_ws, proc_status, receive_events, start_worker
from tests.rawws import raw_connect, send_text

pytestmark = pytest.mark.django_db(transaction=True)


def test_clients_that_never_read_their_replay_pin_little_memory(transactional_db):
    """8 sockets replaying 20 MB each without reading hold a bounded batch each; others keep receiving."""
    # The good client receives the 20 MB live at once: let it buffer that much.
    worker = start_worker(realtime={"MAX_BUFFER": 64 * 1024 * 1024})
    try:
        alice = make_user("alice")
        web = logged_in(alice)
        good, welcome = open_ws(worker, get_token(web), max_queue=None)  # reads as fast as a browser
        blob = "x" * 200_000
        with transaction.atomic():
            for n in range(100):
                publish("big", {"n": n, "blob": blob}, everyone=True)
        receive_events(good, 100, timeout=60)
        before = proc_status(worker.process.pid, "VmRSS")
        sockets = []
        for _ in range(8):
            sock = raw_connect(worker.port, rcvbuf=4096, origin=ORIGIN)
            send_text(sock, json.dumps({"type": "auth", "token": get_token(web), "last_id": welcome["last_id"]}))
            sockets.append(sock)
        time.sleep(3)  # the replays run until their sockets' buffers are full
        grown_mib = (proc_status(worker.process.pid, "VmRSS") - before) / 1024
        publish("small", {}, users=[alice])
        assert receive_events(good, 1)[0]["event"] == "small"
        for sock in sockets:
            sock.close()
        # Before batches were bounded in bytes, each replay held its whole batch: 158 MiB here, now 13.
        assert grown_mib < 60, f"worker grew {grown_mib:.0f} MiB"
        good.close()
    finally:
        worker.stop()


def test_replaying_other_peoples_events_costs_the_worker_no_cpu(transactional_db):
    """10 replays over 40,000 events meant for others: PostgreSQL filters them, the worker does not read them."""
    worker = start_worker()
    try:
        alice, bob = make_user("alice"), make_user("bob")
        web = logged_in(alice)
        _, welcome = open_ws(worker, get_token(web))
        with transaction.atomic():
            publish_many({"event": "for-bob", "data": {"n": n}, "users": [bob.pk]} for n in range(40_000))
        time.sleep(1)  # the live path routes them (to nobody) first
        process = psutil.Process(worker.process.pid)
        before = sum(process.cpu_times()[:2])
        for _ in range(10):
            ws, _ = open_ws(worker, get_token(web), last_id=welcome["last_id"])
            publish("sentinel", {}, users=[alice])
            assert receive_events(ws, 1, timeout=30)[0]["event"] == "sentinel"
            ws.close()
        used = sum(process.cpu_times()[:2]) - before
        # Reading the rows in Python cost about 0.09 s per replay here; filtered by PostgreSQL, 0.002 s.
        assert used < 0.25, f"worker used {used:.2f} s of CPU for 10 replays"
    finally:
        worker.stop()
