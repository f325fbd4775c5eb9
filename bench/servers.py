"""The servers under test, each started as a process group of its own on a free loopback port.

- :func:`start_ours`: ``manage.py runwebsockets 127.0.0.1:PORT [--workers N]``;
- :func:`start_daphne`: ``daphne`` serving ``bench.channels_site.asgi``;
- :func:`start_floor`: ``python -m bench.floor`` (websockets + LISTEN, see :mod:`bench.floor`);
- :func:`start_redis`: ``redis-server`` without persistence, for channels_redis.

Each server's RLIMIT_NOFILE is raised (soft and, as root, hard) before it
starts, the same for every server, so that the file descriptor limit of this
machine (20,000 here) is not what the benchmark measures. Each server dies
with the coordinator (``PR_SET_PDEATHSIG``) and :meth:`Server.stop` ends its
whole process group: SIGTERM, then SIGKILL after a bound.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Server",
    "free_port",
    "redis_available",
    "start_daphne",
    "start_floor",
    "start_ours",
    "start_redis",
    "wait_ready",
]

BASE_DIR = Path(__file__).resolve().parent.parent
SERVER_NOFILE = 262_144


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _prepare_child() -> None:  # runs in the child between fork and exec
    import ctypes
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max(hard, SERVER_NOFILE) if os.geteuid() == 0 else hard
    for limits in ((wanted, wanted), (hard, hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            break
        except (ValueError, OSError):
            continue
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: die with the coordinator


@dataclass
class Server:
    """A started server process (group) and its log."""

    name: str
    process: subprocess.Popen[bytes]
    ports: list[int]
    log_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def pids(self) -> list[int]:
        """Return the pids of the server and all its descendants."""
        found, queue = [], [self.process.pid]
        while queue:
            pid = queue.pop()
            found.append(pid)
            with contextlib.suppress(OSError):
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/children") as children:
                        queue.extend(int(child) for child in children.read().split())
        return found

    def rss(self) -> int:
        """Return the resident memory of the server and its descendants, in bytes."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        return total

    def cpu_seconds(self) -> float:
        """Return the CPU time (user + system) used so far by the server and its descendants."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(OSError, IndexError, ValueError), open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / ticks
        return total

    def alive(self) -> bool:
        """Return True while the main process runs."""
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        """Return the last ``lines`` lines of the server's log (for error messages)."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the process group, wait up to ``timeout``, then SIGKILL it (idempotent)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)


def _spawn(name: str, command: list[str], env: dict[str, str], log_dir: Path, ports: list[int]) -> Server:
    log_dir.mkdir(parents=True, exist_ok=True)
    fd, log_name = tempfile.mkstemp(prefix=f"{name}-", suffix=".log", dir=log_dir)
    with os.fdopen(fd, "wb") as log_file:
        process = subprocess.Popen(
            command,
            cwd=BASE_DIR,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # our own process group: Ctrl-C reaches us once, through the coordinator
            preexec_fn=_prepare_child,
        )
    return Server(name, process, ports, Path(log_name))


def _wait(server: Server, ready: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}")
        with contextlib.suppress(OSError):
            if ready():
                return
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"{server.name}: {what} not ready in {timeout:.0f}s:\n{server.log_tail()}")


def _http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _tcp_open(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def start_ours(
    database_url: str,
    log_dir: Path,
    workers: int = 1,
    settings_module: str = "bench.settings",
    *,
    wait: bool = True,
    extra_env: dict[str, str] | None = None,
) -> Server:
    """Start this project's websocket server; return once every worker answers ``/readyz`` 200.

    With ``wait=False``, return at once; :func:`wait_ready` waits. ``extra_env`` is added to its
    environment (say, ``BENCH_REPLICA_URL`` for ``bench.replica_settings``). Start servers from
    the main thread: each dies when the thread that started it ends (``PR_SET_PDEATHSIG``).
    """
    port = free_port()
    command = [sys.executable, "manage.py", "runwebsockets", f"127.0.0.1:{port}"]
    if workers > 1:
        command += ["--workers", str(workers)]
    env = {"DATABASE_URL": database_url, "DJANGO_SETTINGS_MODULE": settings_module, **(extra_env or {})}
    server = _spawn("ours", command, env, log_dir, [port])
    # With SO_REUSEPORT the kernel picks a worker per connection: ask until every one must have said yes.
    streak = {"n": 0}

    def ready() -> bool:
        if _http_status(port, "/readyz") == 200:
            streak["n"] += 1
        else:
            streak["n"] = 0
        if workers == 1:
            return streak["n"] >= 1
        return streak["n"] >= 12 * workers and len(server.pids()) > workers

    server.extra["ready"] = ready
    if wait:
        wait_ready(server)
    return server


def wait_ready(server: Server, timeout: float = 60.0) -> None:
    """Wait until a server started with ``start_ours(..., wait=False)`` is ready (stop it and raise if not)."""
    _wait(server, server.extra["ready"], timeout, "runwebsockets")


def start_daphne(database_url: str, log_dir: Path, env: dict[str, str]) -> Server:
    """Start daphne with the Channels site; return once it accepts TCP connections."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "daphne",
        "-b",
        "127.0.0.1",
        "-p",
        str(port),
        "bench.channels_site.asgi:application",
    ]
    full_env = {"DATABASE_URL": database_url, "DJANGO_SETTINGS_MODULE": "bench.channels_site.settings", **env}
    server = _spawn("daphne", command, full_env, log_dir, [port])
    _wait(server, lambda: _tcp_open(port), 60, "daphne")
    return server


def start_floor(database_url: str, log_dir: Path, channel: str) -> Server:
    """Start the floor server LISTENing on ``channel``; return once its ``/readyz`` answers 200 (LISTEN in place)."""
    port = free_port()
    command = [sys.executable, "-m", "bench.floor", "--port", str(port), "--channel", channel]
    server = _spawn("floor", command, {"DATABASE_URL": database_url}, log_dir, [port])
    _wait(server, lambda: _http_status(port, "/readyz") == 200, 30, "floor")
    return server


def redis_available() -> str | None:
    """Return the path of ``redis-server``, or None."""
    return shutil.which("redis-server")


def start_redis(log_dir: Path) -> Server:
    """Start a throw-away redis-server on a free loopback port (no persistence); return once it answers PING."""
    binary = redis_available()
    if binary is None:
        raise RuntimeError("redis-server not found")
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    command += ["--daemonize", "no", "--dir", tempfile.gettempdir(), "--maxclients", "10000"]
    server = _spawn("redis", command, {}, log_dir, [port])

    def ready() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    _wait(server, ready, 20, "redis-server")
    server.extra["url"] = f"redis://127.0.0.1:{port}/0"
    return server
