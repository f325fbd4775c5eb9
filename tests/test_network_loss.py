"""Silent network loss: a link cut without FIN or RST is noticed by keepalive pings, and nothing is lost.

The client runs in a network namespace of its own, joined to the host by a
veth pair; the test cuts the link with ``ip link set ... down``, so no packet
(not even a reset) reaches either side. The worker listens on the host's end
of that private link only. Needs root and iproute2 (``.ci/run`` runs as root);
elsewhere it skips, except where REALTIME_REQUIRE_NETNS=1.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from realtime import publish
from realtime.presence import online_users
from tests.helpers import BASE_DIR, ORIGIN, get_token, logged_in, make_user, start_worker

pytestmark = pytest.mark.django_db(transaction=True)

# Keepalive made quick: a silent peer is closed within 1 + 2 + 1 s (plus a ping interval).
KEEPALIVE = {"PING_INTERVAL": 1.0, "PING_TIMEOUT": 2.0, "CLOSE_TIMEOUT": 1.0, "PRESENCE_INTERVAL": 0.3}

CLIENT = """
import json, sys
from realtime.client import RealtimeClient
url, origin, token_file, out_file = sys.argv[1:5]
tokens = iter(open(token_file).read().split())
client = RealtimeClient(url, lambda: next(tokens), origin=origin, min_delay=0.2, max_delay=1.0)
client.connect()
with open(out_file, "a") as out:
    out.write(json.dumps({"type": "connected"}) + "\\n")
    out.flush()
    for message in client:
        out.write(json.dumps(message) + "\\n")
        out.flush()
"""


def run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=10)


@contextlib.contextmanager
def private_link() -> Iterator[tuple[str, str, str]]:
    """A network namespace joined to the host by a veth pair; yields (namespace, host device, host address)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        if os.environ.get("REALTIME_REQUIRE_NETNS"):
            pytest.fail("network namespaces are required here (root and iproute2)")
        pytest.skip("network namespaces need root and iproute2")
    tag = f"rt{os.getpid() % 100000}"
    namespace, host_dev, peer_dev = tag, f"{tag}a", f"{tag}b"
    subnet = f"10.231.{os.getpid() % 250}"
    try:
        run("ip", "netns", "add", namespace)
        run("ip", "link", "add", host_dev, "type", "veth", "peer", "name", peer_dev)
        run("ip", "link", "set", peer_dev, "netns", namespace)
        run("ip", "addr", "add", f"{subnet}.1/30", "dev", host_dev)
        run("ip", "link", "set", host_dev, "up")
        run("ip", "netns", "exec", namespace, "ip", "addr", "add", f"{subnet}.2/30", "dev", peer_dev)
        run("ip", "netns", "exec", namespace, "ip", "link", "set", peer_dev, "up")
        run("ip", "netns", "exec", namespace, "ip", "link", "set", "lo", "up")
    except (OSError, subprocess.CalledProcessError) as exc:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            run("ip", "netns", "del", namespace)
        if os.environ.get("REALTIME_REQUIRE_NETNS"):
            pytest.fail(f"cannot create a network namespace: {exc}")
        pytest.skip(f"cannot create a network namespace: {exc}")
    try:
        yield namespace, host_dev, f"{subnet}.1"
    finally:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            run("ip", "link", "del", host_dev)
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            run("ip", "netns", "del", namespace)


def eventually(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def sockets_from(process: psutil.Process, peer: str) -> int:
    """How many TCP sockets ``process`` holds with ``peer`` (the namespace's end of the link)."""
    return sum(1 for c in process.net_connections("tcp") if c.raddr and c.raddr.ip == peer)


def received(out_file: Path) -> list[dict]:
    return [json.loads(line) for line in out_file.read_text().splitlines() if line.strip()]


def test_a_silently_cut_client_is_closed_freed_and_resumes_without_loss(tmp_path):
    """Link cut: the worker closes the client within its keepalive bounds, frees it, and it leaves presence;
    link back: the client resumes with last_id and gets every event published meanwhile, once, in order."""
    alice = make_user("alice")
    web = logged_in(alice)
    with private_link() as (namespace, host_dev, address):
        worker = start_worker(realtime=KEEPALIVE, host=address)
        client = None
        try:
            process = psutil.Process(worker.process.pid)
            peer = address.rsplit(".", 1)[0] + ".2"
            token_file, out_file = tmp_path / "tokens", tmp_path / "received.jsonl"
            token_file.write_text("\n".join(get_token(web) for _ in range(20)))
            out_file.touch()
            in_namespace = ["ip", "netns", "exec", namespace, sys.executable, "-c", CLIENT]
            client = subprocess.Popen(
                [*in_namespace, worker.url, ORIGIN, str(token_file), str(out_file)],
                cwd=BASE_DIR,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            eventually(lambda: received(out_file), 20, "the client never connected")
            eventually(lambda: online_users().filter(pk=alice.pk).exists(), 10, "alice never came online")
            publish("before", {"n": 0}, users=[alice])
            eventually(lambda: any(m.get("event") == "before" for m in received(out_file)), 10, "no event")

            run("ip", "link", "set", host_dev, "down")  # no FIN, no RST: silence
            cut = time.monotonic()
            eventually(lambda: "realtime_connections 0.0" in worker_metrics(worker), 20, "the worker kept it")
            closed_after = time.monotonic() - cut
            # Bound: PING_INTERVAL + PING_TIMEOUT + CLOSE_TIMEOUT (4 s), with a generous margin.
            assert closed_after < 12, closed_after
            eventually(lambda: not online_users().filter(pk=alice.pk).exists(), 10, "alice stayed online")
            eventually(lambda: sockets_from(process, peer) == 0, 10, "its socket was kept")
            for n in range(1, 6):
                publish("while-cut", {"n": n}, users=[alice])

            run("ip", "link", "set", host_dev, "up")
            run("ip", "netns", "exec", namespace, "ip", "link", "set", f"{host_dev[:-1]}b", "up")
            eventually(
                lambda: (
                    [m["data"]["n"] for m in received(out_file) if m.get("event") == "while-cut"] == [1, 2, 3, 4, 5]
                ),
                60,
                f"not resumed: {received(out_file)}",
            )
            events = [m for m in received(out_file) if m.get("type") == "event"]
            assert [m["id"] for m in events] == sorted({m["id"] for m in events}), "each event once, in order"
            assert "Traceback" not in worker.log()
        finally:
            if client is not None:
                client.kill()
                client.wait(10)
            worker.stop()


def worker_metrics(worker) -> str:
    with contextlib.suppress(OSError):
        return worker.http("/metrics")[1]
    return ""


HALF_OPEN = """
import socket, sys, time
sys.path.insert(0, ".")
from tests.rawws import raw_connect
host, port, origin, ready_file = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
handshaking = socket.create_connection((host, port))
handshaking.sendall(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n")  # never finished
authenticating = raw_connect(port, host=host, origin=origin)  # never authenticates
open(ready_file, "w").write("ready")
time.sleep(120)
"""


def test_half_open_handshakes_and_logins_are_freed(tmp_path):
    """Cut mid-handshake and mid-login: the worker drops both within its timeouts and frees their files."""
    with private_link() as (namespace, host_dev, address):
        worker = start_worker(realtime={**KEEPALIVE, "AUTH_TIMEOUT": 2.0}, host=address)
        client = None
        try:
            process = psutil.Process(worker.process.pid)
            peer = address.rsplit(".", 1)[0] + ".2"
            ready = tmp_path / "ready"
            in_namespace = ["ip", "netns", "exec", namespace, sys.executable, "-c", HALF_OPEN]
            client = subprocess.Popen(
                [*in_namespace, address, str(worker.port), ORIGIN, str(ready)],
                cwd=BASE_DIR,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            eventually(ready.exists, 20, "the half-open client never got going")
            eventually(lambda: sockets_from(process, peer) == 2, 10, "the two sockets were not accepted")
            run("ip", "link", "set", host_dev, "down")
            # websockets' open_timeout (10 s) ends the handshake, AUTH_TIMEOUT (2 s) + CLOSE_TIMEOUT the login.
            eventually(lambda: sockets_from(process, peer) == 0, 30, "their sockets were kept")
            log = worker.log()
            assert "closed 4408: no authentication" in log
            assert "Traceback" not in log
        finally:
            if client is not None:
                client.kill()
                client.wait(10)
            worker.stop()
