"""``python -m bench.soak [--minutes N] [--out DIR]``: the real stack under churn and faults; nothing may leak.

It starts, on loopback and free ports, its own embedded PostgreSQL (pgserver, in
a temporary directory, so that restarting it disturbs nothing else), Django
under gunicorn, and ``manage.py runwebsockets --workers 2``, all on that
database; then, for N minutes, all at once:

- steady tabs (500 connections): each keeps a connection open, reconnects with
  ``last_id`` when it loses it, and now and then closes cleanly and reconnects
  (a page navigation; this also spreads clients over both workers again after a
  worker was killed);
- churn, 50 connections a second: closed cleanly, dropped (TCP reset), dropped
  mid-handshake, or dropped mid-replay (an old ``last_id``, then a reset);
- mutable users' browsers logging in, out and changing their passwords through
  the admin forms, their group and permission changes (ORM, in transactions),
  and their tabs subscribing to and unsubscribing from topics;
- 200 events a second over every audience kind, one ``publish()`` per
  transaction, and a ``publish_many()`` burst of 5,000 events every minute;
- four fault rounds (every 5 minutes in a 20-minute run, scaled with the
  duration): a worker SIGKILLed, then the listeners' connections terminated
  from PostgreSQL; PostgreSQL itself is restarted once.

Then it publishes a final event to everyone, waits until every tab has it,
compares what each client received with the outbox, and writes
``soak.md`` (and ``soak.png`` with matplotlib) to ``--out``. The checks and how
they are defined are in :func:`check_delivery`, :func:`check_flat` and the
report itself. Exit status 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import platform
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped,unused-ignore]
from psycopg.conninfo import make_conninfo

from bench.loadclient import read_answer, stop_children
from bench.servers import Server, _http_status, _spawn, _wait, free_port, start_ours
from bench.soak_agents import AgentConfig, BrowserSpec, ChurnUser, PublisherConfig, TabSpec, client_main, publisher_main

__all__ = ["Plan", "check_delivery", "check_flat", "main", "run"]

BASE_DIR = Path(__file__).resolve().parent.parent
RESULTS_DIR = BASE_DIR / "bench" / "results"
SETTINGS = "bench.settings"
GROWTH_LIMIT = 0.05
# Stable users' groups, permissions and topics never change; mutable users' rights toggle
# among MUTABLE_GROUPS and MUTABLE_PERMISSIONS, and their tabs subscribe to DYNAMIC_TOPICS.
GROUPS = [f"g{i}" for i in range(8)]
MUTABLE_GROUPS = ["mg0", "mg1"]
PERMISSIONS = ["auth.view_user", "auth.view_group"]
MUTABLE_PERMISSIONS = ["auth.view_permission", "auth.change_group"]
TOPICS = [f"t{i}" for i in range(8)]
DYNAMIC_TOPICS = ["dyn0", "dyn1", "dyn2"]
# The share of each audience kind in the steady stream (everyone is costly: one frame per connection).
WEIGHTS: dict[str, float] = {
    "users": 40,
    "groups": 15,
    "permission": 10,
    "staff": 10,
    "everyone": 2,
    "topic": 16,
    "mixed": 7,
}
# Measures sampled per worker process (shown per process in the report).
MEASURES = ("rss", "blocks", "fds", "threads", "tasks", "connections", "registry_keys", "presence", "pg")
# Measures judged flat on the never-killed worker: none follows how many clients it holds.
# "_other": what a measure holds besides the clients' own share (a socket, two tasks, two presence entries each).
# Python's allocated blocks are shown, not judged: with the worker's collector thresholds
# (realtime/worker/memory.py) cyclic garbage builds up for tens of seconds between full collections.
# Threads are judged at rest (Rest): the worker's pool follows the load of its last seconds, so a
# fault round's login burst just before a window says nothing about leaks.
FLAT = ("rss", "fds_other", "tasks_other", "presence_other", "registry_keys", "pg")
# Seconds after the planned end by which load()'s last sample is still the end of the load.
END_SLACK = 5.0
# How long after the load a worker's threads may take to come back to its quietest, beyond the
# pool's own idle time (realtime.worker.server.THREAD_IDLE_RELEASE).
REST_MARGIN = 10.0
# Short runs are still in the allocator's warm-up: their RSS may grow this much (--minutes < RSS_MINUTES).
RSS_MINUTES, SHORT_RUN_RSS_LIMIT = 5.0, 0.25
# Runs shorter than this report the flat measures without judging them: their windows hold one or two
# samples, taken seconds after a fault round (four a minute), and measures such as the fds besides the
# clients swing by tens within a minute of churn (closing sockets). Leaks are judged by longer runs
# (make soak: 20 minutes), threads at rest in every run.
FLAT_MINUTES = 5.0
# A worker's PostgreSQL connections at most: 2 listener, 4 logins (realtime.worker.verifier.POOL_SIZE),
# Django's pool (project/database.py).
PG_BUDGET = 2 + 4 + int(os.environ.get("DJANGO_DB_POOL_SIZE", "10"))
# Seconds by which presence's written picture may lag its live one (REALTIME["PRESENCE_INTERVAL"]).
PRESENCE_LAG = 2.0
LABELS = {
    "rss": "RSS (MiB)",
    "blocks": "Python blocks (k)",
    "tasks_other": "tasks besides 2 per client",
    "presence_other": "presence besides 2 per client",
    "fds": "open fds",
    "fds_other": "fds besides clients",
    "threads": "threads",
    "tasks": "asyncio tasks",
    "connections": "registry clients",
    "registry_keys": "registry index keys",
    "presence": "presence (live + written)",
    "pg": "PostgreSQL connections",
}


@dataclass
class Plan:
    """The sizes and the schedule of a run; :meth:`scaled` fits the fault schedule to ``minutes``."""

    minutes: float = 20.0
    steady: int = 500
    churn_rate: float = 50.0
    event_rate: float = 200.0
    burst_size: int = 5_000
    burst_interval: float = 60.0
    stable_users: int = 120
    mutable_users: int = 6
    browsers_per_user: int = 2
    tabs_per_browser: int = 3
    account_rate: float = 1.0  # logouts + password changes per second (each followed by logins)
    rights_rate: float = 1.5  # group / permission changes per second
    topic_rate: float = 2.0  # subscribe / unsubscribe per second
    rounds: int = 4
    victim_slot: int = 1  # the worker slot SIGKILLed in every round; the other lives through the run

    @property
    def seconds(self) -> float:
        return self.minutes * 60

    @property
    def rotate_mean(self) -> float:
        """Mean seconds between a steady tab's clean reconnections."""
        return min(60.0, self.seconds / 4)

    @property
    def first_burst(self) -> float:
        """Seconds before the first burst: within the warm-up (before 25 %), whose high-water marks it sets."""
        return min(self.burst_interval / 2, 0.2 * self.seconds)

    def faults(self) -> list[tuple[float, str]]:
        """Return (seconds from the start of the load, fault): every quarter of the run, and one restart."""
        schedule = []
        for k in range(self.rounds):
            schedule.append(((0.10 + 0.25 * k) * self.seconds, "kill"))
            schedule.append(((0.15 + 0.25 * k) * self.seconds, "listeners"))
        schedule.append((0.45 * self.seconds, "pg_restart"))
        return sorted(schedule)


# The stack.


class Postgres:
    """An embedded PostgreSQL (pgserver) in ``root``, listening on a loopback TCP port.

    TCP, not the socket pgserver sets up: ``pg_stat_activity.client_port`` then
    says which process holds each connection. As root, pgserver runs PostgreSQL
    as the system user ``pgserver``, and so does :meth:`restart`.
    """

    def __init__(self, root: Path, max_connections: int = 300) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs' XDG_RUNTIME_DIR warning
            import pgserver

            self.server = pgserver.get_server(root / "pgdata", cleanup_mode=None)
        self.pgdata = root / "pgdata"
        self.socket_dir = str(self.server.get_postmaster_info().socket_dir)
        self.port = free_port()
        # Room for every process of the run and a killed worker's connections not yet reaped.
        options = f"-h 127.0.0.1 -p {self.port} -k {self.socket_dir} -c max_connections={max_connections}"
        self._restart_args = ["-w", "-m", "fast", "-t", "60", "-l", str(self.pgdata / "log"), "-o", options, "restart"]
        self.restart()
        self.url = make_conninfo(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")

    def _pg_ctl(self, args: list[str]) -> None:
        from pgserver._commands import pg_ctl  # type: ignore[attr-defined]

        pg_ctl(args, pgdata=self.pgdata, user=self.server.system_user, timeout=90)

    def restart(self) -> float:
        """Restart PostgreSQL (fast shutdown: sessions are ended); return how long it took."""
        started = time.monotonic()
        self._pg_ctl(self._restart_args)
        return time.monotonic() - started

    def version(self) -> str:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as connection:
            return str(connection.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._pg_ctl(["-w", "-m", "immediate", "stop"])


def start_gunicorn(database_url: str, log_dir: Path) -> Server:
    """Django under gunicorn (2 processes x 8 threads) on a free port; return once the admin login answers."""
    port = free_port()
    command = [sys.executable, "-m", "gunicorn", "project.wsgi:application", "-b", f"127.0.0.1:{port}"]
    command += ["-w", "2", "-k", "gthread", "--threads", "8", "--log-level", "warning", "--error-logfile", "-"]
    env = {"DATABASE_URL": database_url, "DJANGO_SETTINGS_MODULE": SETTINGS}
    server = _spawn("gunicorn", command, env, log_dir, [port])
    _wait(server, lambda: _http_status(port, "/admin/login/") == 200, 60, "gunicorn")
    return server


@dataclass
class People:
    """The users of a run, and what each client runs as."""

    stable: dict[int, tuple[str, tuple[str, ...]]] = field(default_factory=dict)  # id -> (session key, topics)
    mutable: dict[int, tuple[str, str, tuple[str, ...]]] = field(default_factory=dict)  # id -> (name, pw, topics)


def create_people(plan: Plan) -> People:
    """Create the groups, the stable users (with a session each) and the mutable (staff) users."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Group, Permission

    from bench.dbsetup import prepare_users

    User = get_user_model()
    groups = {name: Group.objects.get_or_create(name=name)[0] for name in GROUPS + MUTABLE_GROUPS}
    perms = {
        p: Permission.objects.get(content_type__app_label=p.split(".")[0], codename=p.split(".")[1])
        for p in PERMISSIONS + MUTABLE_PERMISSIONS
    }
    people = People()
    for i, bench_user in enumerate(prepare_users(plan.stable_users)):
        user = User.objects.get(pk=bench_user.id)
        user.is_staff, user.is_superuser = i % 6 == 0, i == 7
        user.save()
        user.groups.set([groups[GROUPS[i % 8]]] + ([groups[GROUPS[(i + 3) % 8]]] if i % 3 == 0 else []))
        user.user_permissions.set([perms[p] for j, p in enumerate(PERMISSIONS) if i % 10 == 5 * j])
        topics = (TOPICS[i % 8],) if i % 4 == 0 else (TOPICS[i % 8], TOPICS[(3 * i + 1) % 8])
        people.stable[user.pk] = (bench_user.session_key, topics)
    for i in range(plan.mutable_users):
        name = f"soak-m-{i:02d}"
        User.objects.filter(username=name).delete()
        user = User.objects.create_user(name, password=f"pw-{name}", is_staff=True)
        user.groups.set([groups[GROUPS[i % 8]]])
        people.mutable[user.pk] = (name, f"pw-{name}", (TOPICS[(i + 2) % 8],))
    return people


def agent_configs(plan: Plan, people: People, ws_port: int, web_port: int, log_dir: Path) -> list[AgentConfig]:
    """Two client agents: the first holds every mutable browser; tabs and churn are split evenly."""
    configs = [
        AgentConfig(name=f"agent-{n}", ws_port=ws_port, web_port=web_port, log_path=str(log_dir / f"agent-{n}.log"),
                    tabs=[], rotate_mean=plan.rotate_mean, seed=n)
        for n in range(2)
    ]  # fmt: skip
    first = configs[0]
    tab_number = 0

    def source() -> str:
        nonlocal tab_number
        tab_number += 1
        return f"127.0.{1 + tab_number // 250}.{1 + tab_number % 250}"

    for user_id, (name, password, topics) in people.mutable.items():
        first.passwords[name] = password
        for _ in range(plan.browsers_per_user):
            browser = BrowserSpec(len(first.browsers), user_id, name)
            first.browsers.append(browser)
            for t in range(plan.tabs_per_browser):
                key = f"m{user_id}-b{browser.index}-t{t}"
                first.tabs.append(TabSpec(key, user_id, topics, source(), browser=browser.index))
    stable = list(people.stable.items())
    for i in range(plan.steady - len(first.tabs)):
        user_id, (session, topics) = stable[i % len(stable)]
        emptier = min(configs, key=lambda config: len(config.tabs))
        emptier.tabs.append(TabSpec(f"s{user_id}-{i}", user_id, topics, source(), session=session))
    churn_users = [ChurnUser(user_id, session, topics) for user_id, (session, topics) in stable]
    for n, config in enumerate(configs):
        config.churn_users = churn_users
        config.churn_rate = plan.churn_rate / len(configs)
        config.churn_sources = tuple(f"127.1.{n}.{k}" for k in range(1, 251))
    first.account_rate = plan.account_rate
    first.topic_rate = plan.topic_rate
    first.dynamic_topics = tuple(DYNAMIC_TOPICS)
    return configs


class Agents:
    """Client agent processes and the publisher process, driven over pipes."""

    def __init__(self) -> None:
        self.context = multiprocessing.get_context("spawn")
        self.pipes: list[Any] = []
        self.processes: list[Any] = []

    def start(self, target: Callable[..., None], config: Any, name: str) -> int:
        parent, child = self.context.Pipe()
        process = self.context.Process(target=target, args=(child, config), name=name, daemon=True)
        process.start()
        child.close()
        self.pipes.append(parent)
        self.processes.append(process)
        return len(self.pipes) - 1

    def send(self, index: int, name: str, **args: Any) -> None:
        self.pipes[index].send((name, args))

    def answer(self, index: int, timeout: float) -> Any:
        pipe = self.pipes[index]
        if not pipe.poll(timeout):
            raise TimeoutError(f"{self.processes[index].name}: no answer in {timeout:.0f}s")
        return read_answer(pipe, self.processes[index].name)

    def call(self, indexes: list[int], name: str, timeout: float = 120.0, **args: Any) -> list[Any]:
        for index in indexes:
            self.send(index, name, **args)
        return [self.answer(index, timeout) for index in indexes]

    def close(self) -> None:
        stop_children(self.pipes, self.processes)
        self.pipes, self.processes = [], []


# Sampling.


_INFO = re.compile(r'^realtime_worker_info\{name="worker-(\d+)",pid="(\d+)"\} ', re.MULTILINE)
_GAUGES = {
    "tasks": re.compile(r"^realtime_asyncio_tasks ([\d.e+]+)$", re.MULTILINE),
    "blocks": re.compile(r"^realtime_python_allocated_blocks ([\d.e+]+)$", re.MULTILINE),
    "gc_full": re.compile(r"^realtime_gc_full_collections ([\d.e+]+)$", re.MULTILINE),
    "connections": re.compile(r"^realtime_connections ([\d.e+]+)$", re.MULTILINE),
    "registry_keys": re.compile(r"^realtime_registry_keys ([\d.e+]+)$", re.MULTILINE),
    "presence_live": re.compile(r'^realtime_presence_connections\{state="live"\} ([\d.e+]+)$', re.MULTILINE),
    "presence_written": re.compile(r'^realtime_presence_connections\{state="written"\} ([\d.e+]+)$', re.MULTILINE),
}
_STARTED = re.compile(r"started worker (\d+) \(pid (\d+)\)")


class Sampler:
    """Samples every worker process (and the other processes' PostgreSQL connections) over time."""

    def __init__(self, ws: Server, web: Server, pg: Postgres, others: dict[str, Callable[[], list[int]]]) -> None:
        self.ws, self.web, self.pg = ws, web, pg
        self.others = others
        self.samples: list[dict[str, Any]] = []
        self.slots: dict[int, int] = {}  # slot -> current pid
        self.incarnations: list[tuple[int, int]] = []  # (slot, pid) in start order
        self._log_offset = 0
        self._slots_lock = threading.Lock()  # refresh_slots() is called by the fault loop and the sampling thread
        self._pg: Any = None

    def refresh_slots(self) -> dict[int, int]:
        """Read the supervisor's "started worker N (pid P)" lines written since the last call."""
        with self._slots_lock:
            with open(self.ws.log_path, "rb") as log:
                log.seek(self._log_offset)
                chunk = log.read()
            end = chunk.rfind(b"\n") + 1
            self._log_offset += end
            for slot, pid in _STARTED.findall(chunk[:end].decode(errors="replace")):
                self.slots[int(slot)] = int(pid)
                self.incarnations.append((int(slot), int(pid)))
            return dict(self.slots)

    def scrape(self, pids: set[int], tries: int = 40, budget: float = 2.0) -> dict[int, dict[str, float]]:
        """GET /metrics until each of ``pids`` answered (SO_REUSEPORT picks a worker per connection).

        At most ``tries`` requests and ``budget`` seconds: a worker just killed,
        or restarted and not listening yet, never answers, and a sample must
        not hold up the next one.
        """
        found: dict[int, dict[str, float]] = {}
        port = self.ws.ports[0]
        deadline = time.monotonic() + budget
        pids = {pid for pid in pids if psutil.pid_exists(pid)}
        for _ in range(tries):
            if pids <= found.keys() or time.monotonic() >= deadline:
                break
            try:
                timeout = max(0.1, min(1.0, deadline - time.monotonic()))
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as response:
                    text = response.read().decode()
            except OSError:
                continue
            info = _INFO.search(text)
            if info is None:
                continue
            values = {}
            for name, pattern in _GAUGES.items():
                match = pattern.search(text)
                values[name] = float(match.group(1)) if match else float("nan")
            found[int(info.group(2))] = values
        return found

    def pg_clients(self) -> dict[int, str]:
        """Return {client port: application_name} of PostgreSQL's client backends (empty while it is down)."""
        import psycopg

        for _ in range(2):
            try:
                if self._pg is None or self._pg.closed:
                    self._pg = psycopg.connect(self.pg.url, autocommit=True, application_name="soak-sampler")
                rows = self._pg.execute(
                    "SELECT client_port, coalesce(application_name, '') FROM pg_stat_activity"
                    " WHERE backend_type = 'client backend' AND client_port IS NOT NULL AND pid <> pg_backend_pid()"
                ).fetchall()
                return {int(port): str(name) for port, name in rows}
            except psycopg.Error:
                with contextlib.suppress(Exception):
                    self._pg.close()
                self._pg = None
        return {}

    def _pg_of(self, pids: list[int], clients: dict[int, str]) -> Counter[str]:
        held: Counter[str] = Counter()
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                for conn in psutil.Process(pid).net_connections(kind="tcp"):
                    if conn.raddr and conn.raddr.port == self.pg.port and conn.laddr.port in clients:
                        held[clients[conn.laddr.port] or "(django)"] += 1
        return held

    def sample(self, t: float) -> dict[str, Any]:
        """Take one sample at ``t`` seconds into the load."""
        slots = dict(self.refresh_slots())
        metrics = self.scrape(set(slots.values()))
        clients = self.pg_clients()
        ws_port = self.ws.ports[0]
        workers: dict[int, dict[str, Any]] = {}
        for slot, pid in slots.items():
            try:
                process = psutil.Process(pid)
                with process.oneshot():
                    rss, fds, threads = process.memory_info().rss, process.num_fds(), process.num_threads()
                sockets = process.net_connections(kind="tcp")
            except psutil.Error:
                continue
            client_sockets = sum(1 for c in sockets if c.laddr.port == ws_port and c.raddr)
            held = self._pg_of([pid], clients)
            entry: dict[str, Any] = {
                "pid": pid,
                "rss": rss / 2**20,
                "fds": fds,
                "fds_other": fds - client_sockets,
                "sockets": client_sockets,
                "threads": threads,
                "pg": sum(held.values()),
                "pg_by_name": dict(held),
            }
            if pid in metrics:
                m = metrics[pid]
                presence = m["presence_live"] + m["presence_written"]
                entry.update(
                    blocks=m["blocks"] / 1000,
                    gc_full=m["gc_full"],
                    tasks=m["tasks"],
                    tasks_other=m["tasks"] - 2 * m["connections"],
                    connections=m["connections"],
                    registry_keys=m["registry_keys"],
                    presence=presence,
                    presence_other=presence - 2 * m["connections"],
                )
            workers[slot] = entry
        others = {name: dict(self._pg_of(pids(), clients)) for name, pids in self.others.items()}
        sample = {"t": t, "workers": workers, "others": others, "pg_up": bool(clients)}
        self.samples.append(sample)
        return sample


# Checks.


def _window(values: array[int] | list[int], low: int, high: int) -> list[int]:
    """The values in (low, high] of a sorted sequence."""
    return list(values[bisect.bisect_right(values, low) : bisect.bisect_right(values, high)])


@dataclass
class Delivery:
    """The outcome of the delivery checks for one kind of client."""

    clients: int = 0
    checked: int = 0  # events that had to arrive (and did, unless missing)
    received: int = 0
    missing: int = 0
    extra: int = 0  # received, not entitled
    disorder: int = 0  # duplicates and out-of-order ids (dropped by the recorder)
    examples: list[str] = field(default_factory=list)

    def fail(self, what: str) -> None:
        if len(self.examples) < 8:
            self.examples.append(what)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.disorder)


def check_delivery(
    events: list[tuple[int, Any]],
    identities: dict[Any, Any],
    people: People,
    results: list[dict[str, Any]],
    final: int,
) -> dict[str, Delivery]:
    """Compare what every client received with the outbox.

    ``events`` are the outbox's client events ``(position, Audience)``;
    ``identities`` the stable users' identities and, for each mutable user,
    ``("base", id)`` (the rights it always holds) and ``("union", id)`` (all
    it may hold at some point). ``final`` is the position of the final event.

    - A stable tab must have received exactly the events whose audience
      matches its user and its topics, in ``(start, final]``, where ``start`` is
      its first welcome's ``last_id``: each once, in order, across every
      reconnection (it resumes with ``last_id``).
    - A churn connection (stable users only) must have received exactly those
      events in ``(start, its last received id]``, where ``start`` is the
      ``last_id`` it sent (mid-replay) or its welcome's: no gap, nothing extra,
      in order; it may have been dropped at any point after that.
    - A mutable user's tab legitimately differs where its rights changed: it
      must have received every event in ``(start, final]`` that its *base*
      rights (those never changed) entitle it to, and nothing beyond its *union*
      rights, except events for a dynamic topic, which it may receive only
      between the answers to its subscribe and its unsubscribe on the same
      connection. Replays after a re-login use the rights of that moment,
      which is why those tabs are held to these bounds and not to one set.
    """
    from realtime.core.audience import matches

    profiles: dict[Any, tuple[Any, tuple[str, ...]]] = {}
    for user_id, (_session, topics) in people.stable.items():
        profiles[user_id] = (identities[user_id], topics)
    for user_id, (_name, _pw, topics) in people.mutable.items():
        profiles["base", user_id] = (identities["base", user_id], topics)
        profiles["union", user_id] = (identities["union", user_id], topics)
    # An index to narrow the candidates; matches() decides.
    by_user: dict[int, list[Any]] = defaultdict(list)
    by_group: dict[str, list[Any]] = defaultdict(list)
    by_perm: dict[str, list[Any]] = defaultdict(list)
    by_topic: dict[str, list[Any]] = defaultdict(list)
    staff, superusers = [], []
    for key, (identity, topics) in profiles.items():
        by_user[identity.user_id].append(key)
        for group in identity.groups:
            by_group[group].append(key)
        for perm in identity.permissions:
            by_perm[perm].append(key)
        for topic in topics:
            by_topic[topic].append(key)
        if identity.is_staff:
            staff.append(key)
        if identity.is_superuser:
            superusers.append(key)
    expected: dict[Any, array[int]] = {key: array("q") for key in profiles}
    dynamic_topic: dict[int, str] = {}
    everyone = list(profiles)
    for position, audience in events:
        if audience.topic in DYNAMIC_TOPICS:
            dynamic_topic[position] = audience.topic
        if audience.everyone:
            candidates: Any = everyone
        else:
            candidates = set()
            for user_id in audience.users:
                candidates.update(by_user.get(user_id, ()))
            for group in audience.groups:
                candidates.update(by_group.get(group, ()))
            for perm in audience.permissions:
                candidates.update(by_perm.get(perm, ()))
            if audience.permissions:
                candidates.update(superusers)
            if audience.staff:
                candidates.update(staff)
            if audience.topic is not None:
                candidates.update(by_topic.get(audience.topic, ()))
        for key in candidates:
            identity, topics = profiles[key]
            if matches(identity, topics, audience):
                expected[key].append(position)
    sets: dict[Any, set[int]] = {}

    def entitled(key: Any) -> set[int]:
        if key not in sets:
            sets[key] = set(expected[key])
        return sets[key]

    out = {"stable": Delivery(), "mutable": Delivery(), "churn": Delivery()}
    for result in results:
        kind = result["kind"]
        report = out[kind]
        report.clients += 1
        received = array("q")
        received.frombytes(result["ids"])
        report.received += len(received)
        report.disorder += result["violation_count"]
        for violation in result["violations"][:2]:
            report.fail(f"{result['name']}: {violation}")
        start = result["start"]
        if start is None:
            report.missing += 1
            report.fail(f"{result['name']}: never connected")
            continue
        user_id = result["user_id"]
        if kind == "mutable":
            required = _window(expected["base", user_id], start, final)
            got = set(received)
            missing = [p for p in required if p not in got]
            union = entitled(("union", user_id))
            subscribed = _subscription_test(result["subscriptions"])
            extra = [
                p
                for index, p in enumerate(received)
                if p not in union and not (p in dynamic_topic and subscribed(dynamic_topic[p], index))
            ]
        else:
            end = final if kind == "stable" else (received[-1] if received else start)
            required = _window(expected[user_id], start, end)
            got = set(received)
            missing = [p for p in required if p not in got]
            extra = [p for p in received if p not in entitled(user_id) or not start < p <= end]
        report.checked += len(required)
        report.missing += len(missing)
        report.extra += len(extra)
        if missing:
            report.fail(f"{result['name']} (user {user_id}): {len(missing)} missing, first {missing[:5]}")
        if extra:
            report.fail(f"{result['name']} (user {user_id}): {len(extra)} not entitled, first {extra[:5]}")
    return out


def _subscription_test(log: list[tuple[str, bool, int]]) -> Callable[[str, int], bool]:
    """Return ``subscribed(topic, index)``: was the index-th event received while subscribed to ``topic``?"""
    intervals: dict[str, list[tuple[int, int]]] = defaultdict(list)
    opened: dict[str, int] = {}
    for topic, subscribed, index in log:
        if subscribed:
            opened.setdefault(topic, index)
        elif topic in opened:
            intervals[topic].append((opened.pop(topic), index))
    for topic, index in opened.items():
        intervals[topic].append((index, 1 << 62))
    return lambda topic, index: any(low <= index < high for low, high in intervals.get(topic, ()))


def _median(
    samples: list[dict[str, Any]], t0: float, t1: float, value: Callable[[dict[str, Any]], float | None]
) -> float | None:
    values = [v for s in samples if t0 <= s["t"] < t1 for v in [value(s)] if v is not None]
    return statistics.median(values) if values else None


@dataclass
class Flat:
    """One measure of the never-killed worker, from the baseline window to the end window."""

    measure: str
    baseline: float | None
    end: float | None
    allowed: float  # the most it may grow, in its own unit

    @property
    def growth(self) -> float | None:
        if self.baseline is None or self.end is None:
            return None
        return self.end - self.baseline

    @property
    def ok(self) -> bool:
        return self.growth is not None and self.growth <= self.allowed


def check_flat(samples: list[dict[str, Any]], plan: Plan) -> list[Flat]:
    """Judge each measure of :data:`FLAT` on the worker that is never killed.

    Windows: the baseline is the median over [25 %, 35 %) of the run (after the
    first fault round, before the second), the end the median over the last 5 %.
    A measure may grow by 5 % of its baseline, plus one for counts; the
    measures that are differences ("besides the clients' share") also by 2 % of
    the clients the worker holds, the noise of their terms; the registry's index
    keys by as many keys per extra client as it had per client in the baseline
    window. RSS in runs shorter than ``RSS_MINUTES`` may grow by
    ``SHORT_RUN_RSS_LIMIT``.

    Why this worker alone, and these measures: each fault round moves the
    killed worker's clients onto it, and the steady tabs' rotation spreads them
    back over minutes, so its raw counts follow its share of the clients. What
    is left once each client's own share is taken off (a socket, two tasks, two
    presence entries), the registry's index keys (bounded by the users, groups,
    topics and sessions there are) and PostgreSQL connections must not
    grow at all; the killed worker's processes are young and are reported only.
    Its threads are judged at rest instead (:func:`threads_at_rest`).
    """
    t = plan.seconds
    # The end window also takes load()'s last sample, taken once the sampling thread stopped.
    windows = (0.25 * t, 0.35 * t), (0.95 * t, t + END_SLACK)
    survivor = 1 - plan.victim_slot

    def value(measure: str) -> Callable[[dict[str, Any]], float | None]:
        def get(s: dict[str, Any]) -> float | None:
            worker = s["workers"].get(survivor)
            if measure == "pg" and not s["pg_up"]:
                return None
            return None if worker is None or measure not in worker else float(worker[measure])

        return get

    clients = _median(samples, *windows[1], value("connections")) or 0.0
    clients_before = _median(samples, *windows[0], value("connections")) or 0.0
    out = []
    for measure in FLAT:
        baseline = _median(samples, *windows[0], value(measure))
        end = _median(samples, *windows[1], value(measure))
        limit = SHORT_RUN_RSS_LIMIT if measure == "rss" and plan.minutes < RSS_MINUTES else GROWTH_LIMIT
        allowed = limit * abs(baseline or 0.0)
        if measure not in ("rss", "blocks"):
            allowed += 1
        if measure.endswith("_other"):
            allowed += 0.02 * clients
        if measure == "pg":
            # Pools open connections lazily, up to their sizes: judged against the worker's budget.
            allowed = max(allowed, PG_BUDGET - (baseline or 0.0))
        if measure == "registry_keys" and clients_before:
            # Its users, sessions and topics: more clients (a fault round moved the killed worker's onto
            # it) bring at most as many keys each as its clients had in the baseline window (fewer: the
            # same users and groups recur); a leak shows where its clients are as many as before.
            allowed += (baseline or 0.0) / clients_before * max(0.0, clients - clients_before)
        if measure == "presence_other":
            # The written picture lags the live one by a presence round (2 s): that much churn.
            allowed += plan.churn_rate * PRESENCE_LAG
        out.append(Flat(measure, baseline, end, allowed))
    return out


@dataclass
class Rest:
    """The never-killed worker's threads once the load stopped, against its quietest moment during the run."""

    fewest: int | None  # the fewest threads in any sample of the run
    at_end: int | None  # in the last sample of the load
    at_rest: int | None  # once quiet (None: the worker was gone)
    waited: float  # seconds from the end of the load to ``at_rest``

    @property
    def ok(self) -> bool:
        # One more than the fewest: presence writes and the periodic reads may overlap.
        return self.fewest is not None and self.at_rest is not None and self.at_rest <= self.fewest + 1


def threads_at_rest(sampler: Sampler, slot: int, quiet_since: float) -> Rest:
    """Wait until ``slot``'s worker is back to its fewest threads (+1), at most the pool's idle time + REST_MARGIN.

    A thread of the worker's pool stops once idle for THREAD_IDLE_RELEASE seconds
    (realtime.worker.threads); the clients stay connected, so presence and the
    periodic reads keep one warm. Threads that never stop (a leak) fail it.
    """
    from realtime.worker.server import THREAD_IDLE_RELEASE

    points = [s["workers"][slot]["threads"] for s in sampler.samples if slot in s["workers"]]
    fewest, at_end = (min(points), points[-1]) if points else (None, None)
    pid = sampler.refresh_slots().get(slot)
    deadline = quiet_since + THREAD_IDLE_RELEASE + REST_MARGIN
    at_rest = None
    while pid is not None and fewest is not None:
        try:
            at_rest = psutil.Process(pid).num_threads()
        except psutil.Error:
            at_rest = None
            break
        if at_rest <= fewest + 1 or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    return Rest(fewest, at_end, at_rest, time.monotonic() - quiet_since)


def scan_logs(paths: list[Path]) -> dict[str, int]:
    """Count tracebacks in each log."""
    found = {}
    for path in paths:
        with contextlib.suppress(OSError):
            found[path.name] = path.read_text(errors="replace").count("Traceback (most recent call last)")
    return found


# The run.


class Soak:
    """One soak run: the stack, the load, the faults, the samples, the checks."""

    def __init__(self, plan: Plan, out: Path, work: Path) -> None:
        self.plan, self.out, self.work = plan, out, work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.faults: list[tuple[float, str, str]] = []  # (t, fault, outcome)
        self.counts: Counter[str] = Counter()
        self.stop_mutating = threading.Event()
        self.t0 = 0.0

    def say(self, text: str) -> None:
        print(text, flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def mutate_forever(self, people: People) -> None:
        """Toggle mutable users' groups and permissions, one change per transaction (thread)."""
        from django.contrib.auth import get_user_model
        from django.contrib.auth.models import Group, Permission
        from django.db import DatabaseError, connection, transaction

        rng = random.Random(7)
        User = get_user_model()
        users = list(people.mutable)
        while not self.stop_mutating.wait(rng.expovariate(self.plan.rights_rate)):
            user_id = rng.choice(users)
            item = rng.choice(MUTABLE_GROUPS + MUTABLE_PERMISSIONS)
            try:
                with transaction.atomic():
                    user = User.objects.get(pk=user_id)
                    if item in MUTABLE_GROUPS:
                        group = Group.objects.get(name=item)
                        related: Any = user.groups
                        target: Any = group
                    else:
                        app_label, codename = item.split(".")
                        target = Permission.objects.get(content_type__app_label=app_label, codename=codename)
                        related = user.user_permissions
                    if related.filter(pk=target.pk).exists():
                        related.remove(target)
                    else:
                        related.add(target)
                self.counts["rights changes"] += 1
            except DatabaseError:
                self.counts["rights changes failed"] += 1
                with contextlib.suppress(Exception):
                    connection.close()
        connection.close()

    def inject(self, fault: str, pg: Postgres, sampler: Sampler) -> str:
        import psycopg

        if fault == "kill":
            pid = sampler.refresh_slots().get(self.plan.victim_slot)
            if pid is None:
                return "no worker to kill"
            os.kill(pid, signal.SIGKILL)
            return f"worker {self.plan.victim_slot} (pid {pid}) SIGKILLed"
        if fault == "listeners":
            try:
                with psycopg.connect(pg.url, autocommit=True, connect_timeout=10) as connection:
                    rows = connection.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                        ["realtime-listener"],
                    ).fetchall()
            except psycopg.Error as exc:
                return f"failed: {exc}"
            return f"{sum(1 for (ok,) in rows if ok)} listener connections terminated"
        return f"PostgreSQL restarted in {pg.restart():.1f} s"

    def run(self) -> int:
        plan = self.plan
        servers: list[Server] = []
        agents = Agents()
        pg: Postgres | None = None
        try:
            self.say(f"soak: {plan.minutes:g} minutes; work directory {self.work}")
            pg = Postgres(self.work)
            from bench.dbsetup import configure_django, migrate

            configure_django(pg.url, SETTINGS)
            migrate()
            people = create_people(plan)
            web = start_gunicorn(pg.url, self.logs)
            servers.append(web)
            ws = start_ours(pg.url, self.logs, workers=2, settings_module=SETTINGS)
            servers.append(ws)
            self.say(f"soak: PostgreSQL {pg.version()} on :{pg.port}, gunicorn on :{web.ports[0]}, "
                     f"runwebsockets --workers 2 on :{ws.ports[0]}")  # fmt: skip
            configs = agent_configs(plan, people, ws.ports[0], web.ports[0], self.logs)
            clients = [agents.start(client_main, config, config.name) for config in configs]
            publisher_config = PublisherConfig(
                database_url=pg.url,
                settings_module=SETTINGS,
                log_path=str(self.logs / "publisher.log"),
                rate=plan.event_rate,
                burst_size=plan.burst_size,
                burst_interval=plan.burst_interval,
                burst_first=plan.first_burst,
                users=list(people.stable) + list(people.mutable),
                groups=GROUPS + MUTABLE_GROUPS,
                permissions=PERMISSIONS + MUTABLE_PERMISSIONS,
                topics=TOPICS + DYNAMIC_TOPICS,
                weights=WEIGHTS,
            )
            publisher = agents.start(publisher_main, publisher_config, "soak-publisher")
            agents.answer(publisher, 60)
            others = {
                "gunicorn": lambda: web.pids(),
                "publisher": lambda: [agents.processes[publisher].pid],
                "soak": lambda: [os.getpid()],
            }
            sampler = Sampler(ws, web, pg, others)
            started = agents.call(clients, "start", timeout=120)
            self.say(f"soak: {sum(s['open_tabs'] for s in started)} of {plan.steady} steady tabs open")
            self.t0 = time.monotonic()
            agents.call(clients, "load")
            agents.call([publisher], "start")
            mutator = threading.Thread(target=self.mutate_forever, args=(people,), name="soak-mutator")
            mutator.start()
            self.load(agents, clients, publisher, pg, sampler)
            return self.finish(agents, clients, publisher, pg, sampler, people, servers, mutator)
        finally:
            self.stop_mutating.set()
            agents.close()
            for server in reversed(servers):
                server.stop()
            if pg is not None:
                pg.stop()

    def load(self, agents: Agents, clients: list[int], publisher: int, pg: Postgres, sampler: Sampler) -> None:
        """Run the load for the planned time: faults on schedule, samples, a progress line every 10 s.

        Faults are injected here; samples and progress lines are taken in
        threads of their own, so that a slow sample (a busy machine, a worker
        just killed) or a slow answer from the agents never delays a fault or
        leaves a window of the run without samples.
        """
        plan = self.plan
        schedule = plan.faults()
        every = max(1.0, min(10.0, plan.seconds / 120))
        stop = threading.Event()
        failures: list[BaseException] = []

        def repeat(action: Callable[[], None], interval: float) -> Callable[[], None]:
            def run() -> None:
                try:
                    due = self.elapsed()
                    while not stop.is_set():
                        action()
                        due = max(due + interval, self.elapsed())
                        stop.wait(due - self.elapsed())
                except BaseException as exc:
                    failures.append(exc)

            return run

        observers = [
            threading.Thread(target=repeat(lambda: sampler.sample(self.elapsed()), every), name="soak-sampler"),
            threading.Thread(
                target=repeat(lambda: self.progress(self.elapsed(), agents, clients, publisher, sampler), 10.0),
                name="soak-progress",
            ),
        ]
        for observer in observers:
            observer.start()
        try:
            while (t := self.elapsed()) < plan.seconds and not failures:
                if schedule and t >= schedule[0][0]:
                    _, fault = schedule.pop(0)
                    outcome = self.inject(fault, pg, sampler)
                    self.faults.append((t, fault, outcome))
                    self.say(f"soak: [{t:5.0f}s] fault: {outcome}")
                else:
                    time.sleep(0.05)
        finally:
            stop.set()
            sampling, progress = observers
            sampling.join(120)
            if not failures:
                # The end window's sample, whatever the sampling thread's last one missed.
                sampler.sample(self.elapsed())
            progress.join(120)
        if failures:
            raise failures[0]

    def progress(self, t: float, agents: Agents, clients: list[int], publisher: int, sampler: Sampler) -> None:
        statuses = agents.call(clients, "status", timeout=30)
        published = agents.call([publisher], "status", timeout=30)[0]
        counts: Counter[str] = Counter()
        for status in statuses:
            counts.update(status["counts"])
        churned = sum(v for k, v in counts.items() if k.startswith("churn ") and "failed" not in k)
        last = sampler.samples[-1] if sampler.samples else {"workers": {}}
        workers = ", ".join(
            f"w{slot} {w['rss']:.0f} MiB {w['fds']} fds {w.get('connections', 0):.0f} clients {w['pg']} pg"
            for slot, w in sorted(last["workers"].items())
        )
        failed = sum(v for k, v in published.items() if "failed" in k)
        self.say(
            f"soak: [{t:5.0f}s] tabs {sum(s['open_tabs'] for s in statuses)}/{self.plan.steady}, churn {churned:,},"
            f" events {published.get('published', 0) + published.get('published in bursts', 0):,} ({failed} failed),"
            f" frames {sum(s['frames'] for s in statuses):,}, rights {self.counts['rights changes']},"
            f" logins {counts['logins']}, faults {len(self.faults)} | {workers}"
        )

    def finish(
        self,
        agents: Agents,
        clients: list[int],
        publisher: int,
        pg: Postgres,
        sampler: Sampler,
        people: People,
        servers: list[Server],
        mutator: threading.Thread,
    ) -> int:
        """Stop the load, deliver a final event to everyone, check, report; return the exit status."""
        from django.db import close_old_connections, connection

        from realtime import publish
        from realtime.models import Event

        t_end = sampler.samples[-1]["t"]  # load() took it as the load ended
        published = agents.call([publisher], "stop", timeout=120)[0]
        self.stop_mutating.set()
        mutator.join(30)
        quiesced = agents.call(clients, "quiesce", timeout=120)
        quiet_since = time.monotonic()
        close_old_connections()
        final_event = publish("soak.final", {}, everyone=True)
        final = Event.objects.values_list("position", flat=True).get(pk=final_event.pk)
        assert final is not None, "a committed event has a position"
        behind = agents.call(clients, "wait_for", timeout=150, position=final, within=90.0)
        results: list[dict[str, Any]] = []
        agent_counts: Counter[str] = Counter()
        for answer in agents.call(clients, "results", timeout=300):
            agent_counts.update(answer["counts"])
            for tab in answer["tabs"]:
                results.append({**tab, "kind": "mutable" if tab["mutable"] else "stable", "name": tab["key"]})
            for n, record in enumerate(answer["churn"]):
                results.append({**record, "kind": "churn", "name": f"churn-{record['mode']}-{n}"})
        del quiesced
        self.say(f"soak: final event {final}; checking {len(results):,} clients against the outbox")
        events, identities = _outbox_and_identities(people)
        connection.close()
        delivery = check_delivery(events, identities, people, results, final)
        flat = check_flat(sampler.samples, self.plan)
        rest = threads_at_rest(sampler, 1 - self.plan.victim_slot, quiet_since)
        agents.close()
        for server in reversed(servers):
            server.stop()
        logs = [server.log_path for server in servers] + sorted(self.logs.glob("*.log"))
        tracebacks = scan_logs(sorted(set(logs)))
        report = Report(
            plan=self.plan,
            pg_version=pg.version(),
            delivery=delivery,
            flat=flat,
            rest=rest,
            tracebacks=tracebacks,
            faults=self.faults,
            samples=sampler.samples,
            incarnations=sampler.incarnations,
            published=published,
            agent_counts=agent_counts,
            coordinator_counts=self.counts,
            behind=[b for answer in behind for b in answer["behind"]],
            events_in_outbox=len(events),
            duration=t_end,
        )
        text = report.markdown()
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "soak.md").write_text(text)
        plotted = plot(sampler.samples, self.faults, self.out / "soak.png")
        # Kept with the logs (--keep-logs) for a closer look.
        (self.logs / "samples.json").write_text(json.dumps({"samples": sampler.samples, "faults": self.faults}))
        self.say(text)
        self.say(
            f"soak: wrote {self.out / 'soak.md'}" + (f" and {plotted}" if plotted else " (no plot: no matplotlib)")
        )
        return 0 if report.ok else 1


def _outbox_and_identities(people: People) -> tuple[list[tuple[int, Any]], dict[Any, Any]]:
    """Read every client event of the outbox, in order, and the identities the checks use."""
    from django.contrib.auth import get_user_model
    from django.db import connection

    from realtime.core.audience import Audience, Identity

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT position, " + ", ".join(Audience._fields) + " FROM realtime_event"
            " WHERE NOT control AND position IS NOT NULL ORDER BY position"
        )
        events = [(row[0], Audience(*row[1:])) for row in cursor.fetchall()]
    identities: dict[Any, Any] = {}
    User = get_user_model()
    for user in User.objects.filter(pk__in=list(people.stable) + list(people.mutable)).prefetch_related("groups"):
        groups = frozenset(g.name for g in user.groups.all())
        perms = frozenset(user.get_all_permissions())
        identity = Identity(user.pk, user.username, "", user.is_staff, user.is_superuser, groups, perms)
        if user.pk in people.stable:
            identities[user.pk] = identity
        else:
            base_groups = groups - set(MUTABLE_GROUPS)
            base_perms = perms - set(MUTABLE_PERMISSIONS)
            identities["base", user.pk] = Identity(user.pk, user.username, "", True, False, base_groups, base_perms)
            union = Identity(
                user.pk,
                user.username,
                "",
                True,
                False,
                base_groups | set(MUTABLE_GROUPS),
                base_perms | set(MUTABLE_PERMISSIONS),
            )
            identities["union", user.pk] = union
    return events, identities


# The report.


def machine() -> str:
    """Cores, memory, CPU model, Python, the kernel."""
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = psutil.virtual_memory().total / 2**30
    return (
        f"{os.cpu_count()} cores ({model}), {memory:.0f} GiB RAM, Python {platform.python_version()},"
        f" Linux {platform.release()}"
    )


@dataclass
class Report:
    plan: Plan
    pg_version: str
    delivery: dict[str, Delivery]
    flat: list[Flat]
    rest: Rest
    tracebacks: dict[str, int]
    faults: list[tuple[float, str, str]]
    samples: list[dict[str, Any]]
    incarnations: list[tuple[int, int]]
    published: dict[str, int]
    agent_counts: Counter[str]
    coordinator_counts: Counter[str]
    behind: list[Any]
    events_in_outbox: int
    duration: float

    def fault_ok(self) -> bool:
        done = Counter(f for _, f, outcome in self.faults if not outcome.startswith(("failed", "no worker")))
        restarted = sum(1 for slot, _ in self.incarnations if slot == self.plan.victim_slot) - 1
        return done["kill"] == self.plan.rounds and done["listeners"] == self.plan.rounds and done["pg_restart"] == 1 \
            and restarted >= self.plan.rounds  # fmt: skip

    @property
    def ok(self) -> bool:
        return (
            all(d.ok for d in self.delivery.values())
            and (not self.flat_judged or all(f.ok for f in self.flat))
            and self.rest.ok
            and not any(self.tracebacks.values())
            and self.fault_ok()
            and not self.behind
        )

    @property
    def flat_judged(self) -> bool:
        return self.plan.minutes >= FLAT_MINUTES

    def checks(self) -> list[tuple[str, bool | None, str]]:
        """(title, passed, detail) per check; passed is None for a check this run is too short to judge."""
        d = self.delivery
        rows = []
        titles = {
            "stable": "Steady tabs of stable users: every entitled event in (first welcome, final], once, in order",
            "mutable": "Tabs of mutable users: every event of their base rights, nothing beyond their union rights",
            "churn": "Churn connections: exactly the entitled events up to the last one received, in order",
        }
        for kind, title in titles.items():
            r = d[kind]
            detail = (
                f"{r.clients:,} clients, {r.checked:,} events required, {r.received:,} received; {r.missing:,} missing,"
                f" {r.extra:,} not entitled, {r.disorder:,} duplicate or out of order"
            )
            if kind == "stable" and self.behind:
                detail += f"; {len(self.behind)} tab(s) never got the final event"
            rows.append((title, r.ok and not (kind != "churn" and self.behind), detail))
        extra = sum(r.extra for r in d.values())
        received = sum(r.received for r in d.values())
        rows.append(("Nothing reached anyone not entitled", extra == 0, f"{extra:,} of {received:,} frames"))
        bad = [f for f in self.flat if not f.ok]
        survivor = 1 - self.plan.victim_slot
        grew = "grew: " + ", ".join(LABELS[f.measure] for f in bad)
        rows.append(
            (
                f"Worker {survivor} (never killed) flat after warm-up: from [25 %, 35 %) of the run to its last 5 %",
                not bad if self.flat_judged else None,
                ("see the table below" if not bad else grew)
                if self.flat_judged
                else f"a run under {FLAT_MINUTES:g} minutes is too short to judge: "
                + ("shown below" if not bad else f"over, shown below ({grew})"),
            )
        )
        r = self.rest
        rows.append(
            (
                f"Worker {survivor}'s threads back to its quietest once the load stopped",
                r.ok,
                f"fewest during the run {r.fewest}, at the end of the load {r.at_end},"
                f" {r.at_rest} after {r.waited:.0f} s of quiet (allowed: {'—' if r.fewest is None else r.fewest + 1})",
            )
        )
        traced = {name: n for name, n in self.tracebacks.items() if n}
        rows.append(("No traceback in any log", not traced, ", ".join(f"{k}: {v}" for k, v in traced.items())
                     or f"{len(self.tracebacks)} logs scanned"))  # fmt: skip
        kills = sum(1 for _, f, _ in self.faults if f == "kill")
        rows.append(
            ("Faults injected and survived", self.fault_ok(), f"{len(self.faults)} faults, {kills} worker kills")
        )
        return rows

    def markdown(self) -> str:
        p = self.plan
        lines = [
            "# Soak",
            "",
            f"`python -m bench.soak --minutes {p.minutes:g}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: "
            f"{self.duration / 60:.1f} minutes of load. Machine: {machine()}; PostgreSQL {self.pg_version} "
            "(embedded, pgserver, its own data directory).",
            "",
            f"Load: {p.steady} steady tabs ({p.mutable_users * p.browsers_per_user * p.tabs_per_browser} of them of"
            f" {p.mutable_users} mutable users in {p.mutable_users * p.browsers_per_user} browsers), reconnecting with"
            f" `last_id` after every loss and, cleanly, every {p.rotate_mean:.0f} s on average; churn"
            f" {p.churn_rate:g} connections/s (clean 30 %, TCP reset 30 %, mid-handshake 20 %, mid-replay 20 %);"
            f" {p.event_rate:g} events/s, one `publish()` per transaction, across every audience kind, and a"
            f" `publish_many()` of {p.burst_size:,} every {p.burst_interval:g} s; logins, logouts and password changes"
            " through gunicorn and the admin's forms, group and permission changes, subscriptions to dynamic topics."
            " Stack: PostgreSQL, gunicorn (2 x 8 threads), `runwebsockets --workers 2`.",
            "",
            "## Checks",
            "",
            "| Check | Result | Detail |",
            "|---|---|---|",
        ]
        for title, ok, detail in self.checks():
            result = "not judged" if ok is None else "PASS" if ok else "**FAIL**"
            lines.append(f"| {title} | {result} | {detail} |")
        lines += ["", "Examples of failures:" if any(d.examples for d in self.delivery.values()) else ""]
        for kind, d in self.delivery.items():
            lines += [f"- {kind}: {e}" for e in d.examples]
        if self.behind:
            lines += [f"- behind at the end: {b}" for b in self.behind[:10]]
        lines += ["", "## Load achieved", "", "| What | Count |", "|---|---|"]
        counts = Counter(self.published)
        counts.update(self.agent_counts)
        counts.update(self.coordinator_counts)
        counts["events in the outbox (clients' events)"] = self.events_in_outbox
        for key, value in sorted(counts.items()):
            lines.append(f"| {key} | {value:,} |")
        lines += ["", "## Faults", "", "| At | Fault | Outcome |", "|---|---|---|"]
        lines += [f"| {t:.0f} s | {fault} | {outcome} |" for t, fault, outcome in self.faults]
        lines += ["", "## Worker resources", "", *self.resource_tables()]
        return "\n".join(lines) + "\n"

    def live_objects(self, slot: int) -> str:
        """A sentence on the worker's Python blocks right after its full collections (its live objects)."""
        points = _after_full_collections(self.samples, slot)
        if not points:
            return f"Worker {slot} ran no full garbage collection between two samples that both answered /metrics."
        shown = points if len(points) <= 8 else [*points[:4], *points[-4:]]
        listed = ", ".join(f"{t:.0f} s: {blocks:,.0f}k ({clients:.0f} clients)" for t, blocks, clients in shown)
        return (
            f"Worker {slot}'s Python blocks at the first sample after each of its {len(points)} full collections"
            f" seen (its live objects, with the clients it held){' (first and last four)' if len(points) > 8 else ''}:"
            f" {listed}."
        )

    def resource_tables(self) -> list[str]:
        lines = [
            "Each worker process (slot, pid) from its first to its last sample; slot"
            f" {self.plan.victim_slot} is SIGKILLed in every fault round and restarted by the supervisor."
            " PostgreSQL connections are counted per process from `pg_stat_activity.client_port` (PostgreSQL"
            " listens on TCP for this) and the process's sockets, by `application_name`.",
            "",
            "| Worker | pid | samples | " + " | ".join(LABELS[m] for m in MEASURES) + " | PostgreSQL by name (end) |",
            "|---|---|---|" + "---|" * len(MEASURES) + "---|",
        ]
        series: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
        for sample in self.samples:
            for slot, worker in sample["workers"].items():
                series[slot, worker["pid"]].append(worker)
        for (slot, pid), points in sorted(series.items(), key=lambda item: (item[0][0], item[1][0]["pid"])):
            first, last = points[0], points[-1]
            cells = []
            for measure in MEASURES:
                if measure in first and measure in last:
                    fmt = "{:.1f}" if measure in ("rss", "blocks") else "{:.0f}"
                    cells.append(f"{fmt.format(first[measure])} → {fmt.format(last[measure])}")
                else:
                    cells.append("—")
            by_name = ", ".join(f"{k} {v}" for k, v in sorted(last["pg_by_name"].items()))
            lines.append(f"| {slot} | {pid} | {len(points)} | " + " | ".join(cells) + f" | {by_name} |")
        survivor = 1 - self.plan.victim_slot
        rss_limit = SHORT_RUN_RSS_LIMIT if self.plan.minutes < RSS_MINUTES else GROWTH_LIMIT
        lines += [
            "",
            f"Worker {survivor}, never killed, from the baseline window [25 %, 35 %) of the run to the end window"
            " (its last 5 %), medians. Each fault round moves the killed worker's clients onto it (the tabs'"
            " rotation spreads them back over minutes), so what is judged is what does not follow its share of"
            " the clients: RSS, what it holds besides each client's share (one"
            " socket, two asyncio tasks, two presence entries: live and written), the registry's index keys"
            " (bounded by the users, groups, topics and sessions there are) and PostgreSQL connections."
            f" Runs under {FLAT_MINUTES:g} minutes show this table without judging it (one or two samples per"
            " window, four fault rounds a minute)."
            f" Allowed growth: {rss_limit:.0%} of the baseline for RSS (runs under {RSS_MINUTES:g} minutes are"
            " still in the allocator's warm-up), 5 % for the rest, plus one for counts, plus 2 % of its clients"
            " for the differences, for the registry's index keys as many keys per client it holds beyond its"
            " baseline clients as it had per client then (its users, sessions and topics recur), and for presence"
            f" the churn of {PRESENCE_LAG:g} s (a presence round) by which"
            " the written picture may lag the live one. PostgreSQL connections may grow up to the worker's budget"
            f" ({PG_BUDGET}: 2 listener, 4 logins, Django's pool), which its pools fill lazily."
            " Its threads follow the load of its last seconds (an idle thread of its pool stops after 10 s), so"
            " they are judged once the load stopped: back to the fewest it had during the run, plus one."
            f" Worker {self.plan.victim_slot}'s processes are young (killed"
            " every round) and are reported above only."
            " Python's allocated blocks (`sys.getallocatedblocks()`) are shown above, not judged: with the"
            " worker's collector thresholds, cyclic garbage builds up for tens of seconds between full collections.",
            "",
            "| Measure | Baseline | End | Growth | Allowed | Result |",
            "|---|---|---|---|---|---|",
        ]
        for f in self.flat:
            baseline = "—" if f.baseline is None else f"{f.baseline:,.1f}"
            end = "—" if f.end is None else f"{f.end:,.1f}"
            growth = "—" if f.growth is None else f"{f.growth:+,.1f}"
            result = ("PASS" if f.ok else "**FAIL**") if self.flat_judged else ("within" if f.ok else "over")
            lines.append(f"| {LABELS[f.measure]} | {baseline} | {end} | {growth} | {f.allowed:,.1f} | {result} |")
        lines += ["", self.live_objects(survivor)]
        others: dict[str, list[int]] = defaultdict(list)
        for sample in self.samples:
            for name, held in sample["others"].items():
                if sample["pg_up"]:
                    others[name].append(sum(held.values()))
        if others:
            held = ", ".join(f"{n} {min(v)} / {max(v)}" for n, v in sorted(others.items()) if v)
            lines += ["", f"PostgreSQL connections of the other processes (min / max over the samples): {held}."]
        return lines


def _after_full_collections(samples: list[dict[str, Any]], slot: int) -> list[tuple[float, float, float]]:
    """(t, k blocks, clients) of ``slot`` at each first sample after a full collection of the same process."""
    found, previous = [], None
    for sample in samples:
        worker = sample["workers"].get(slot)
        if worker is None or "gc_full" not in worker:
            continue
        if previous is not None and previous["pid"] == worker["pid"] and worker["gc_full"] > previous["gc_full"]:
            found.append((sample["t"], worker["blocks"], worker["connections"]))
        previous = worker
    return found


def plot(samples: list[dict[str, Any]], faults: list[tuple[float, str, str]], path: Path) -> Path | None:
    """Draw RSS, open fds and PostgreSQL connections of each worker over time; None without matplotlib."""
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    figure, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    for axis, measure in zip(axes, ("rss", "fds", "pg"), strict=True):
        lines: dict[tuple[int, int], tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
        for sample in samples:
            if measure == "pg" and not sample["pg_up"]:
                continue  # PostgreSQL was restarting: nobody to ask
            for slot, worker in sample["workers"].items():
                xs, ys = lines[slot, worker["pid"]]
                xs.append(sample["t"] / 60)
                ys.append(worker[measure])
        for (slot, _pid), (xs, ys) in sorted(lines.items()):
            axis.plot(xs, ys, color=f"C{slot}", label=f"worker {slot}" if len(xs) > 1 else None)
        for t, fault, _ in faults:
            axis.axvline(t / 60, color="grey", alpha=0.3, linestyle={"kill": "-", "listeners": ":"}.get(fault, "--"))
        axis.set_ylabel(LABELS[measure])
        axis.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    axes[0].legend(unique.values(), unique.keys(), loc="lower right")
    axes[-1].set_xlabel("minutes (grey: worker killed —, listeners terminated ···, PostgreSQL restarted - -)")
    figure.suptitle("Soak: each worker process over time")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


@contextlib.contextmanager
def _work_directory() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="realtime-soak-"))
    path.chmod(0o755)  # pgserver's user must reach the data directory inside
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run(plan: Plan, out: Path, keep: bool = False) -> int:
    """Run one soak with ``plan``; write the report to ``out``; return the exit status."""
    with _work_directory() as work:
        try:
            return Soak(plan, out, work).run()
        finally:
            if keep:
                kept = out / "soak-logs"
                shutil.rmtree(kept, ignore_errors=True)
                shutil.copytree(work / "logs", kept)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Parse options and run the soak; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="minutes of load (default 20)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where to write soak.md and soak.png")
    parser.add_argument("--keep-logs", action="store_true", help="copy the processes' logs to OUT/soak-logs")
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    # SIGTERM stops the run like Ctrl-C: every process it started is stopped on the way out.
    signal.signal(signal.SIGTERM, _interrupt)
    return run(Plan(minutes=args.minutes), args.out, keep=args.keep_logs)


if __name__ == "__main__":
    sys.exit(main())
