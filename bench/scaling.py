"""Workload (g), issue 17: what one PostgreSQL pays as websocket workers are added.

For each worker count in ``ScalingSizes.workers`` (1, 2, 4, 8, 16), that many
``runwebsockets`` processes, each on a port of its own (as separate hosts
would be), each holding ``per_worker`` authenticated client connections (one
user each). Events go at each rate of ``ScalingSizes.rates`` (200, 1,000 and
5,000/s) for ``seconds``, each to one connected user: every worker receives
every event, one worker delivers it. The publishing mode is part of the rate:
``batch`` events per transaction (``publish()`` alone at 1, ``publish_many()``
above). A transaction of at most 16 small events carries them in its NOTIFY
payload (no worker reads the table); a bigger one makes every worker read the
rows (migration 0006).

Measured per rate window, on a PostgreSQL of this run's own (pgserver's
binaries, TCP on loopback; nothing else uses it, so its processes' CPU is
this workload's):

- the primary's CPU: the postmaster's and every child's (``/proc/<pid>/schedstat``),
  plus the postmaster's reaped children (``cutime`` + ``cstime``), before and after,
  less the bench's own sampler's backend; and the same per process, attributed
  by ``pg_stat_activity`` to what it serves (a worker's LISTEN connection, its
  reading connection, its logins, its Django threads; the publisher; PostgreSQL's
  background processes; the sampler);
- rows read from ``realtime_event`` (``pg_stat_user_tables``: ``seq_tup_read``
  + ``idx_tup_fetch``), ``pg_stat_database``'s ``tup_returned``,
  ``tup_fetched`` and ``xact_commit`` (no pg_stat_statements in pgserver's
  build: the worker's reads are autocommit statements, one transaction each);
- WAL written (``pg_current_wal_lsn()`` difference), NOTIFYs (= publishing
  commits) and the notification queue's peak (``pg_notification_queue_usage()``);
- commit → receipt p50 / p99 per worker; the slowest worker's are reported;
- connections each worker holds, by ``application_name`` (``pg_stat_activity``
  ``client_port`` matched to the worker's sockets): at rest, during the login
  burst, during the rate windows, during a burst of replays, and at the end.

The floor: right after each worker count's windows, the same rates (for
``floor_seconds``) with as many bare LISTEN processes as there were workers and
no worker: what PostgreSQL charges for the listeners alone, in the same run.

Backends flush their statistics at the end of a transaction at most once a
second; before reading the counters the run waits a second and commits one
batch every worker reads, so each window's reads are counted in that window.

Everything is bounded (counts, waits) and stopped in ``finally`` blocks.
Run as ``python -m bench.scaling`` (``python -m bench`` runs it in a
subprocess of its own: Django is set up for this run's database here).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

__all__ = ["FULL", "REPLICA", "REPLICA_SMOKE", "SMOKE", "ScalingSizes", "main", "markdown", "run"]

BASE_DIR = Path(__file__).resolve().parent.parent
RESULTS_DIR = BASE_DIR / "bench" / "results"
DATABASE = "realtime_scaling"
# A transaction of at most this many events (that fit in 8,000 bytes) carries them in its NOTIFY (migration 0006).
PAYLOAD_EVENTS = 16
APPS = ("realtime-listener", "realtime-auth", "django", "other")
TOKEN_LIFETIME = 3000.0


@dataclass(frozen=True)
class ScalingSizes:
    """Counts and durations of one (g) run (all bounded)."""

    workers: tuple[int, ...] = (1, 2, 4, 8, 16)
    # (events per second, events per transaction)
    rates: tuple[tuple[int, int], ...] = ((200, 1), (1_000, 10), (5_000, 16), (5_000, 100))
    per_worker: int = 200
    seconds: float = 6.0
    replays_per_worker: int = 25
    client_processes: int = 2
    concurrency: int = 50
    wait_timeout: float = 30.0
    # Longest wait for the last receipt of a window (a saturated machine delivers late, not never).
    drain: float = 30.0
    settle: float = 1.5
    # With the clients connected and no events: the primary's cost of the workers alone.
    idle_seconds: float = 3.0
    # With the most workers, how many connections each still holds this long after the last burst.
    rest_after: float = 25.0
    max_connections: int = 600
    # The floor: the same rates, as long each, with as many bare LISTEN processes as workers and no worker.
    floor_seconds: float = 3.0
    # The --replica variant: each worker count twice, the workers reading from the primary and from a
    # streaming replica of it (REALTIME["READ_DATABASE"]), in alternating order; no floor.
    replica: bool = False


FULL = ScalingSizes()
SMOKE = ScalingSizes(
    workers=(1, 2),
    rates=((50, 1), (200, 10), (400, 40)),
    per_worker=6,
    seconds=1.0,
    replays_per_worker=3,
    concurrency=10,
    settle=0.5,
    drain=20.0,
    idle_seconds=0.5,
    rest_after=1.0,
    floor_seconds=0.5,
)


# The --replica variant: the table-read rate and one payload rate, 1, 4 and 16 workers, each reading
# from the primary and from the replica. No floor (the full run has it), no 25 s rest sample.
REPLICA = replace(
    FULL, workers=(1, 4, 16), rates=((5_000, 16), (5_000, 100)), rest_after=0.0, floor_seconds=0.0, replica=True
)
REPLICA_SMOKE = replace(
    SMOKE, workers=(1,), rates=((200, 10), (400, 40)), rest_after=0.0, floor_seconds=0.0, replica=True
)


def mode_of(batch: int) -> str:
    """How a transaction of ``batch`` small events reaches the workers."""
    return "NOTIFY payload" if batch <= PAYLOAD_EVENTS else "table read"


# The primary, seen from outside.


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()


def _children(pid: int) -> list[int]:
    found = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as children:
                found.extend(int(child) for child in children.read().split())
    return found


def postgres_cpu_seconds(postmaster: int) -> float:
    """CPU time of PostgreSQL: the postmaster, its live children, and its children that exited.

    Live processes by ``/proc/<pid>/schedstat`` (nanoseconds, as :meth:`Sampler.backends`
    reads them, so a backend's share can be taken out of the sum); exited ones by the
    postmaster's ``cutime`` + ``cstime`` (clock ticks: a backend's whole life is
    counted there once it is reaped, its time while live having been counted above).
    """
    ticks = os.sysconf("SC_CLK_TCK")
    fields = _stat_fields(postmaster)
    total = (int(fields[13]) + int(fields[14])) / ticks + _cpu_ns(postmaster) / 1e9
    for pid in _children(postmaster):
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += _cpu_ns(pid) / 1e9
    return total


def _publish(agents: Any, rate: int, seconds: float, users: list[int], k_base: int, batch: int) -> dict[str, Any]:
    """Have the publishing agent commit ``rate`` events a second for ``seconds``, ``batch`` per commit; its answer."""
    answer: dict[str, Any] = agents.call(
        0,
        "paced_batches",
        timeout=seconds * 4 + 120,
        rate=rate,
        seconds=seconds,
        users=users,
        k_base=k_base,
        batch=batch,
        start_at=time.time() + 0.2,
    )
    return answer


def _machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot (/proc/stat)."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def _tcp_sockets() -> dict[int, tuple[int, int]]:
    """{socket inode: (local port, remote port)} of this machine's TCP sockets."""
    found: dict[int, tuple[int, int]] = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(name) as table:
            next(table)
            for line in table:
                parts = line.split()
                local, remote, inode = parts[1], parts[2], int(parts[9])
                if inode:
                    found[inode] = (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16))
    return found


def _socket_inodes(pid: int) -> list[int]:
    inodes = []
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.append(int(target[8:-1]))
    return inodes


def _cpu_ns(pid: int) -> int:
    """CPU time a process has run, in nanoseconds (``/proc/<pid>/schedstat``: finer than utime's 10 ms ticks)."""
    with open(f"/proc/{pid}/schedstat") as schedstat:
        return int(schedstat.read().split()[0])


# What the primary's processes are, for the CPU attribution (``Sampler.backends()``).
KINDS = (
    "listener: LISTEN",
    "listener: read",
    "realtime-auth",
    "worker: Django",
    "publisher",
    "bench sampler",
    "bare LISTEN",
    "walsender",
    "background",
)
BARE_LISTENER = "bench-bare-listener"


class Sampler:
    """Samples, on a connection of its own: each worker's PostgreSQL connections and the notification queue.

    :meth:`watch` runs :meth:`sample` in a thread about ``hz`` times a second
    and keeps each worker's peak per ``application_name`` and the queue's peak.
    """

    def __init__(self, url: str, pg_port: int, database: str) -> None:
        import psycopg

        self.connection = psycopg.connect(url, autocommit=True, application_name="bench-sampler")
        self.pg_port, self.database = pg_port, database
        self.lock = threading.Lock()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.close()

    def connections(self, pids: Sequence[int]) -> dict[int, Counter[str]]:
        """Return, per worker pid, its connections to PostgreSQL by application name."""
        with self.lock:
            rows = self.connection.execute(
                "SELECT client_port, coalesce(application_name, '') FROM pg_stat_activity"
                " WHERE backend_type = 'client backend' AND datname = %s AND client_port > 0",
                [self.database],
            ).fetchall()
        apps = {int(port): str(name) for port, name in rows}
        sockets = _tcp_sockets()
        held: dict[int, Counter[str]] = {}
        for pid in pids:
            counts: Counter[str] = Counter()
            for inode in _socket_inodes(pid):
                ports = sockets.get(inode)
                if ports and ports[1] == self.pg_port and ports[0] in apps:
                    name = apps[ports[0]]
                    counts[name if name in APPS else ("django" if not name else "other")] += 1
            held[pid] = counts
        return held

    def backends(self, worker_pids: Sequence[int], postmaster: int) -> dict[int, tuple[str, int]]:
        """Return {PostgreSQL process id: (kind, CPU ns so far)} for the postmaster and its children.

        A kind is one of ``KINDS``: a worker's connections (matched to its sockets by
        ``client_port``) by ``application_name``, the listener's LISTEN connection told from
        its reading one by its last statement; the bench's own (publisher, sampler); and
        PostgreSQL's background processes (with the postmaster).
        """
        from realtime.outbox import NEWEST_POSITION

        with self.lock:
            rows = self.connection.execute(
                "SELECT pid, coalesce(backend_type, ''), coalesce(application_name, ''), coalesce(client_port, 0),"
                " coalesce(query, '') FROM pg_stat_activity"
            ).fetchall()
        sockets = _tcp_sockets()
        owner: dict[int, int] = {}
        for pid in worker_pids:
            for inode in _socket_inodes(pid):
                ports = sockets.get(inode)
                if ports and ports[1] == self.pg_port:
                    owner[ports[0]] = pid
        kinds: dict[int, str] = {}
        for pid, backend_type, app, port, query in rows:
            if backend_type == "walsender":
                kind = "walsender"  # a streaming replica's (the --replica variant)
            elif backend_type != "client backend":
                kind = "background"
            elif app == "bench-sampler":
                kind = "bench sampler"
            elif app == BARE_LISTENER:
                kind = "bare LISTEN"
            elif int(port) not in owner:
                kind = "publisher"
            elif app == "realtime-listener":
                listen = query.startswith("LISTEN") or query == NEWEST_POSITION
                kind = "listener: LISTEN" if listen else "listener: read"
            elif app == "realtime-auth":
                kind = "realtime-auth"
            else:
                kind = "worker: Django"
            kinds[int(pid)] = kind
        found: dict[int, tuple[str, int]] = {}
        for pid in [postmaster, *_children(postmaster)]:
            with contextlib.suppress(OSError, IndexError, ValueError):
                found[pid] = (kinds.get(pid, "background"), _cpu_ns(pid))
        return found

    def queue_usage(self) -> float:
        with self.lock:
            row = self.connection.execute("SELECT pg_notification_queue_usage()").fetchone()
        return float(row[0]) if row else 0.0

    @contextlib.contextmanager
    def watch(self, pids: Sequence[int], hz: float = 4.0) -> Iterator[dict[str, Any]]:
        """Sample while the block runs; the yielded dict gets ``peak`` ({pid: {app: n}}) and ``queue_peak``."""
        found: dict[str, Any] = {"peak": {pid: Counter() for pid in pids}, "queue_peak": 0.0, "samples": 0}
        stop = threading.Event()

        def loop() -> None:
            while True:
                with contextlib.suppress(Exception):
                    for pid, counts in self.connections(pids).items():
                        peak = found["peak"][pid]
                        for name, n in counts.items():
                            peak[name] = max(peak[name], n)
                    found["queue_peak"] = max(found["queue_peak"], self.queue_usage())
                    found["samples"] += 1
                if stop.wait(1 / hz):
                    return

        thread = threading.Thread(target=loop, name="bench-sampler", daemon=True)
        thread.start()
        try:
            yield found
        finally:
            stop.set()
            thread.join(10)
            found["peak"] = {pid: dict(c) for pid, c in found["peak"].items()}

    def event_rows(self) -> dict[str, float]:
        """``realtime_event``'s scans and rows read so far (works on a hot standby too)."""
        with self.lock:
            self.connection.execute("SELECT pg_stat_clear_snapshot()")
            row = self.connection.execute(
                "SELECT coalesce(seq_scan, 0), coalesce(seq_tup_read, 0), coalesce(idx_scan, 0),"
                " coalesce(idx_tup_fetch, 0) FROM pg_stat_user_tables WHERE relname = 'realtime_event'"
            ).fetchone()
        seq_scan, seq_read, idx_scan, idx_fetch = row or (0, 0, 0, 0)
        return {"event_scans": float(seq_scan + idx_scan), "event_rows_read": float(seq_read + idx_fetch)}

    def counters(self) -> dict[str, float]:
        """The cumulative counters a window is measured by (WAL position, database and outbox statistics)."""
        with self.lock:
            self.connection.execute("SELECT pg_stat_clear_snapshot()")
            wal, commits, returned, fetched = self.connection.execute(
                "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn, xact_commit, tup_returned, tup_fetched"
                " FROM pg_stat_database WHERE datname = %s",
                [self.database],
            ).fetchone()  # type: ignore[misc]
            row = self.connection.execute(
                "SELECT coalesce(seq_scan, 0), coalesce(seq_tup_read, 0), coalesce(idx_scan, 0),"
                " coalesce(idx_tup_fetch, 0) FROM pg_stat_user_tables WHERE relname = 'realtime_event'"
            ).fetchone()
        seq_scan, seq_read, idx_scan, idx_fetch = row or (0, 0, 0, 0)
        return {
            "wal": float(wal),
            "xact_commit": float(commits),
            "tup_returned": float(returned),
            "tup_fetched": float(fetched),
            "event_scans": float(seq_scan + idx_scan),
            "event_rows_read": float(seq_read + idx_fetch),
        }


def cpu_by_kind(before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]]) -> dict[str, Any]:
    """Seconds of CPU per kind between two ``Sampler.backends()`` snapshots, and how many processes of each kind."""
    seconds: dict[str, float] = dict.fromkeys(KINDS, 0.0)
    count: dict[str, int] = dict.fromkeys(KINDS, 0)
    for pid, (kind, ns) in after.items():
        # A process that started during the window (a new connection) counts from its start.
        seconds[kind] += (ns - before[pid][1] if pid in before else ns) / 1e9
        count[kind] += 1
    return {"seconds": seconds, "processes": count}


def _summary(held: dict[int, dict[str, int]]) -> dict[str, Any]:
    """Per-worker connection counts → the largest worker's count per app and in all, and the total."""
    totals = [sum(c.values()) for c in held.values()] or [0]
    by_app = {app: max((c.get(app, 0) for c in held.values()), default=0) for app in APPS}
    return {"max_per_worker": max(totals), "total": sum(totals), "by_app_max": by_app}


def _percentile(values: Sequence[float], fraction: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


# The floor: what PostgreSQL charges for a listener that does nothing but LISTEN.


def bare_listener(conninfo: str, channel: str, received: Any, ready: Any, stop: Any) -> None:
    """A process that LISTENs on ``channel`` and only counts what arrives (the floor's listener; no query)."""
    import psycopg

    with psycopg.connect(conninfo, autocommit=True, application_name=BARE_LISTENER) as connection:
        connection.execute(f"LISTEN {channel}")
        ready.set()
        while not stop.is_set():
            for _ in connection.notifies(timeout=0.2):
                received.value += 1


class BareListeners:
    """``n`` processes, each with one connection that LISTENs on the workers' channel and does nothing else."""

    def __init__(self, conninfo: str, n: int, timeout: float = 60.0) -> None:
        import multiprocessing

        from realtime.outbox import NOTIFY_CHANNEL

        context = multiprocessing.get_context("spawn")  # not fork: this process has threads and Django
        self.stop = context.Event()
        self.counts = [context.Value("q", 0, lock=False) for _ in range(n)]
        readies = [context.Event() for _ in range(n)]
        self.processes = [
            context.Process(target=bare_listener, args=(conninfo, NOTIFY_CHANNEL, count, ready, self.stop), daemon=True)
            for count, ready in zip(self.counts, readies, strict=True)
        ]
        try:
            for process in self.processes:
                process.start()
            for ready in readies:
                if not ready.wait(timeout):
                    raise RuntimeError("(g) a bare listener did not start LISTENing in time")
        except BaseException:
            self.close()
            raise

    def received(self) -> list[int]:
        """How many notifications each listener has received so far."""
        return [int(count.value) for count in self.counts]

    def close(self) -> None:
        self.stop.set()
        for process in self.processes:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)


# The run.


class Scaling:
    """One (g) run against a PostgreSQL of its own (see the module docstring)."""

    def __init__(self, sizes: ScalingSizes, work: Path, say: Any) -> None:
        self.sizes = sizes
        self.work = work
        self.say = say
        self.k_next = 1
        self.standby: Any = None  # the --replica variant's streaming replica (bench.replica.Standby)
        self.replica_sampler: Sampler | None = None

    def run(self) -> dict[str, Any]:
        from bench import dbsetup
        from bench.agents import AgentPool
        from bench.harness import machine
        from bench.loadclient import LoadClient
        from bench.soak import Postgres

        sizes = self.sizes
        began = time.monotonic()
        pg = Postgres(self.work, max_connections=sizes.max_connections)
        try:
            self.url = _create_database(pg.url, DATABASE)
            dbsetup.configure_django(self.url)
            dbsetup.migrate()
            self.postmaster = int((pg.pgdata / "postmaster.pid").read_text().split()[0])
            self.pg_port = pg.port
            self.users = dbsetup.prepare_users(max(sizes.workers) * sizes.per_worker + 1)
            self.sampler = Sampler(self.url, pg.port, DATABASE)
            results: dict[str, Any] = {
                "sizes": asdict(sizes),
                "postgresql": pg.version(),
                "load_average_at_start": os.getloadavg(),
                "points": [],
                "floor": [],
                "workers": {},
            }
            results["machine"] = machine()  # asks PostgreSQL its version: while it runs
            try:
                with (
                    LoadClient(sizes.client_processes) as client,
                    AgentPool("ours", 1, "bench.settings", self.url) as agents,
                ):
                    if sizes.replica:
                        self.replica_phases(pg, client, agents, results)
                    for n in [] if sizes.replica else sizes.workers:
                        self.say(f"(g) {n} worker(s), {n * sizes.per_worker:,} connections")
                        entry, points = self.workers_phase(n, client, agents)
                        results["workers"][str(n)] = entry
                        results["points"] += points
                        results["floor"] += self.floor_phase(n, agents)
            finally:
                self.sampler.close()
                if self.replica_sampler is not None:
                    self.replica_sampler.close()
                if self.standby is not None:
                    self.standby.stop()
            results["load_average_at_end"] = os.getloadavg()
            results["duration_s"] = time.monotonic() - began
            return results
        finally:
            from django.db import connections

            connections.close_all()
            pg.stop()

    def replica_phases(self, pg: Any, client: Any, agents: Any, results: dict[str, Any]) -> None:
        """The --replica variant: a streaming replica of ``pg``; each worker count reading from either."""
        from bench.replica import start_standby

        sizes = self.sizes
        began = time.monotonic()
        self.standby = start_standby(pg, self.work / "replica", sizes.max_connections)
        # No VACUUM ANALYZE here: with realtime_event empty, it made every publishing commit cost 10 to 30 times
        # as much until autovacuum analyzed the table again (about a minute; the commit trigger's plan).
        self.standby.wait_caught_up(self.url)
        results["replica"] = {"port": self.standby.port, "setup_s": time.monotonic() - began}
        self.say(f"(g) replica on port {self.standby.port}, ready in {results['replica']['setup_s']:.1f} s")
        self.replica_postmaster = self.standby.postmaster()
        self.replica_sampler = Sampler(self.standby.conninfo(DATABASE), self.standby.port, DATABASE)
        for i, n in enumerate(sizes.workers):
            # Alternate which goes first, so that a drift of the machine's load does not favour one.
            for read in ("primary", "replica") if i % 2 == 0 else ("replica", "primary"):
                self.say(f"(g) {n} worker(s) reading from the {read}, {n * sizes.per_worker:,} connections")
                entry, points = self.workers_phase(n, client, agents, read)
                results["workers"][f"{n} {read}"] = entry
                results["points"] += points

    def start_workers(self, n: int, read: str = "primary") -> list[Any]:
        """Start ``n`` single-worker servers (from this thread: they die with the thread that started them).

        ``read="replica"``: with ``READ_DATABASE`` naming the run's replica (``bench.replica_settings``).
        """
        from bench.servers import start_ours, wait_ready

        settings_module, env = "bench.settings", {}
        if read == "replica":
            settings_module = "bench.replica_settings"
            env = {"BENCH_REPLICA_URL": self.standby.conninfo(DATABASE, application_name=None)}
        servers: list[Any] = []
        try:
            for _ in range(n):
                servers.append(
                    start_ours(self.url, self.work / "logs", settings_module=settings_module, wait=False, extra_env=env)
                )
            for server in servers:
                wait_ready(server)
        except BaseException:
            for server in servers:
                server.stop()
            raise
        return servers

    def workers_phase(
        self, n: int, client: Any, agents: Any, read: str = "primary"
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        from bench import dbsetup
        from bench.loadclient import source_address

        sizes = self.sizes
        servers = self.start_workers(n, read)
        pids = [s.process.pid for s in servers]
        try:
            entry: dict[str, Any] = {"pids": pids}
            time.sleep(sizes.settle)
            entry["at_rest"] = _summary({p: dict(c) for p, c in self.sampler.connections(pids).items()})
            owners = self.users[: n * sizes.per_worker]
            tokens = dbsetup.mint_tokens(owners, TOKEN_LIFETIME)
            specs = [
                (
                    servers[i % n].ports[0],
                    source_address(i),
                    "",
                    json.dumps({"type": "auth", "token": t, "last_id": None}),
                )
                for i, t in enumerate(tokens)
            ]
            with self.sampler.watch(pids) as logins:
                joined = client.connect(specs, concurrency=sizes.concurrency, timeout=sizes.wait_timeout, budget=120)
            entry["logins"] = {
                "ok": joined.ok,
                "failures": dict(joined.failures),
                "seconds": joined.finished - joined.started,
                **_summary(logins["peak"]),
            }
            if joined.ok < len(specs):
                raise RuntimeError(
                    f"(g) {n} workers: {joined.ok}/{len(specs)} connected ({dict(joined.failures)}); "
                    f"a worker's log:\n{servers[0].log_tail()}"
                )
            time.sleep(sizes.settle)
            entry["after_logins"] = _summary({p: dict(c) for p, c in self.sampler.connections(pids).items()})
            entry["idle"] = self.idle(sizes.idle_seconds)
            first_position = self._newest_position()
            points = []
            for rate, batch in sizes.rates:
                point = self.window(n, servers, client, agents, rate, batch, entry["idle"])
                point["reads"] = read
                points.append(point)
                self.say(
                    f"  {rate:,}/s, {batch} per commit ({point['mode']}): {point['received']:,}/{point['published']:,} "
                    f"received, primary {point['cpu_us_per_event']:.0f} µs/event, "
                    f"slowest worker p50 {point['slowest_p50_ms']:.2f} ms p99 {point['slowest_p99_ms']:.2f} ms, "
                    f"{point['connections']['max_per_worker']} connections/worker"
                )
                kinds = point["cpu_by_kind"]
                self.say(
                    "    primary µs per commit, per process of each kind: "
                    + ", ".join(
                        f"{kind} {kinds['seconds'][kind] / point['commits'] / kinds['processes'][kind] * 1e6:.1f}"
                        f" (x{kinds['processes'][kind]})"
                        for kind in KINDS
                        if kinds["processes"][kind]
                    )
                )
            entry["replays"] = self.replays(n, servers, client, first_position)
            entry["end"] = _summary({p: dict(c) for p, c in self.sampler.connections(pids).items()})
            entry["end"]["seconds_after_last_burst"] = time.monotonic() - entry["replays"]["ended"]
            if n == max(sizes.workers) and sizes.rest_after > 0:
                time.sleep(max(0.0, sizes.rest_after - entry["end"]["seconds_after_last_burst"]))
                entry["rested"] = _summary({p: dict(c) for p, c in self.sampler.connections(pids).items()})
                entry["rested"]["seconds_after_last_burst"] = time.monotonic() - entry["replays"]["ended"]
            client.close_all()
            return entry, points
        finally:
            client.close_all()
            for server in servers:
                server.stop()

    def floor_phase(self, n: int, agents: Any) -> list[dict[str, Any]]:
        """The floor for ``n`` workers: the same rates with ``n`` bare LISTEN processes instead (no worker)."""
        self.say(f"(g) floor: {n} bare LISTEN process(es), no worker")
        listeners = BareListeners(self.url, n, timeout=self.sizes.wait_timeout)
        try:
            time.sleep(self.sizes.settle)
            points = []
            for rate, batch in self.sizes.rates:
                point = self.floor_window(n, listeners, agents, rate, batch)
                points.append(point)
                self.say(
                    f"  {rate:,}/s, {batch} per commit: primary {point['cpu_us_per_event']:.0f} µs/event, "
                    f"each bare LISTEN {point['listen_us_per_commit']:.1f} µs/commit"
                )
            return points
        finally:
            listeners.close()

    def floor_window(self, n: int, listeners: BareListeners, agents: Any, rate: int, batch: int) -> dict[str, Any]:
        """One rate window of the floor: publish as :meth:`window` does, wait until every listener has every NOTIFY."""
        sizes = self.sizes
        total = int(rate * sizes.floor_seconds)
        k_base = self._reserve_keys(total)
        users = [u.id for u in self.users[: n * sizes.per_worker]]
        before = listeners.received()
        backends_before = self.sampler.backends([], self.postmaster)
        cpu_before, window_began = postgres_cpu_seconds(self.postmaster), time.monotonic()
        busy_before = _machine_jiffies()
        answer = _publish(agents, rate, sizes.floor_seconds, users, k_base, batch)
        commits = len(answer["commits"])
        deadline = time.monotonic() + sizes.drain
        while time.monotonic() < deadline:
            if min(after - first for after, first in zip(listeners.received(), before, strict=True)) >= commits:
                break
            time.sleep(0.02)
        cpu_after, window_s = postgres_cpu_seconds(self.postmaster), time.monotonic() - window_began
        by_kind = cpu_by_kind(backends_before, self.sampler.backends([], self.postmaster))
        busy_after = _machine_jiffies()
        notified = [after - first for after, first in zip(listeners.received(), before, strict=True)]
        sampler_s = by_kind["seconds"]["bench sampler"]
        return {
            "workers": n,
            "rate": rate,
            "batch": batch,
            "mode": mode_of(batch),
            "published": total,
            "commits": commits,
            "notified_min": min(notified),
            "cpu_s": cpu_after - cpu_before - sampler_s,
            "sampler_cpu_s": sampler_s,
            "cpu_us_per_event": (cpu_after - cpu_before - sampler_s) / max(total, 1) * 1e6,
            "listen_us_per_commit": by_kind["seconds"]["bare LISTEN"] / max(commits, 1) / n * 1e6,
            "cpu_by_kind": by_kind,
            "window_s": window_s,
            "machine_busy": (busy_after[0] - busy_before[0]) / max(busy_after[1] - busy_before[1], 1),
        }

    def idle(self, seconds: float) -> dict[str, float]:
        """The primary's CPU (share of a core) and transactions per second with the clients connected, no events."""
        before, cpu_before = self.sampler.counters(), postgres_cpu_seconds(self.postmaster)
        time.sleep(seconds)
        after, cpu_after = self.sampler.counters(), postgres_cpu_seconds(self.postmaster)
        return {
            "cpu_share": (cpu_after - cpu_before) / seconds,
            "xact_per_s": (after["xact_commit"] - before["xact_commit"]) / seconds,
            "wal_per_s": (after["wal"] - before["wal"]) / seconds,
        }

    def _reserve_keys(self, total: int) -> int:
        """Return the first of ``total`` event keys no earlier window used (with a margin)."""
        k_base = self.k_next
        self.k_next += total + 1000
        return k_base

    def _newest_position(self) -> int:
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute("SELECT coalesce(max(position), 0) FROM realtime_event")
            return int(cursor.fetchone()[0])

    def window(
        self, n: int, servers: list[Any], client: Any, agents: Any, rate: int, batch: int, idle: dict[str, float]
    ) -> dict[str, Any]:
        """One rate window: publish, wait for every receipt, read the counters; return the point."""
        sizes = self.sizes
        conns = n * sizes.per_worker
        users = [u.id for u in self.users[:conns]]
        total = int(rate * sizes.seconds)
        k_base = self._reserve_keys(total)
        client.set_mode("latency")
        pids = [s.process.pid for s in servers]
        counters_before = self.sampler.counters()
        backends_before = self.sampler.backends(pids, self.postmaster)
        replica = self.replica_sampler
        if replica is not None:
            replica_rows_before = replica.event_rows()
            replica_backends_before = replica.backends(pids, self.replica_postmaster)
            replica_cpu_before = postgres_cpu_seconds(self.replica_postmaster)
        cpu_before, window_began = postgres_cpu_seconds(self.postmaster), time.monotonic()
        workers_before = sum(s.cpu_seconds() for s in servers)
        busy_before = _machine_jiffies()
        with self.sampler.watch(pids, hz=5) as watched:
            answer = _publish(agents, rate, sizes.seconds, users, k_base, batch)
            deadline = time.monotonic() + sizes.drain
            while time.monotonic() < deadline:
                if sum(p["received"] for p in client.poll()) >= total:
                    break
                time.sleep(0.05)
        cpu_after, window_s = postgres_cpu_seconds(self.postmaster), time.monotonic() - window_began
        by_kind = cpu_by_kind(backends_before, self.sampler.backends(pids, self.postmaster))
        if replica is not None:
            replica_cpu_after = postgres_cpu_seconds(self.replica_postmaster)
            replica_by_kind = cpu_by_kind(replica_backends_before, replica.backends(pids, self.replica_postmaster))
        workers_after = sum(s.cpu_seconds() for s in servers)
        busy_after = _machine_jiffies()
        wal_after = self.sampler.counters()["wal"]
        # Backends flush their statistics at most once a second, at a transaction's end: one more batch
        # that every worker reads, a second later, makes each count this window's reads now.
        time.sleep(1.1)
        agents.call(0, "wake_all", user=self.users[-1].id, count=PAYLOAD_EVENTS + 4)
        time.sleep(0.5)
        counters_after = self.sampler.counters()
        counters_after["wal"] = wal_after
        if replica is not None:
            replica_rows_after = replica.event_rows()
        stats = client.stats()

        committed: dict[int, float] = {}
        for first, count, at in answer["commits"]:
            for i in range(int(first), int(first) + int(count)):
                committed[i] = at
        per_worker: dict[int, list[float]] = defaultdict(list)
        seen: Counter[int] = Counter()
        for process in stats:
            for k, t in process["pairs"]:
                i = k - k_base
                if i in committed:
                    seen[i] += 1
                    # Event i went to user i % conns, whose one connection is on worker (i % conns) % n.
                    per_worker[(i % conns) % n].append((t - committed[i]) * 1000)
        received = len(seen)
        duplicates = sum(c - 1 for c in seen.values())
        slowest = max(per_worker, key=lambda w: _percentile(per_worker[w], 0.99), default=0)
        all_latencies = [v for values in per_worker.values() for v in values]
        elapsed = answer["end"] - answer["start"]
        delta = {key: counters_after[key] - counters_before[key] for key in counters_before}
        events = max(total, 1)
        sampler_s = by_kind["seconds"]["bench sampler"]
        cpu_s = cpu_after - cpu_before - sampler_s
        busy = (busy_after[0] - busy_before[0]) / max(busy_after[1] - busy_before[1], 1)
        on_replica: dict[str, Any] = {}
        if replica is not None:
            # The replica's CPU (its sampler left out): the workers' reads, and its WAL replay and receiver.
            replica_sampler_s = replica_by_kind["seconds"]["bench sampler"]
            replica_cpu_s = replica_cpu_after - replica_cpu_before - replica_sampler_s
            on_replica = {
                "replica_cpu_s": replica_cpu_s,
                "replica_cpu_us_per_event": replica_cpu_s / events * 1e6,
                "replica_cpu_by_kind": replica_by_kind,
                "replica_event_rows_read_per_event": (
                    replica_rows_after["event_rows_read"] - replica_rows_before["event_rows_read"]
                )
                / events,
                "replica_event_scans_per_event": (
                    replica_rows_after["event_scans"] - replica_rows_before["event_scans"]
                )
                / events,
            }
        return {
            **on_replica,
            "workers": n,
            "connections_total": conns,
            "rate": rate,
            "batch": batch,
            "mode": mode_of(batch),
            "published": total,
            "commits": len(answer["commits"]),
            "achieved_rate": total / elapsed if elapsed > 0 else math.nan,
            "received": received,
            "lost": total - received,
            "duplicates": duplicates,
            # The bench's own sampler (pg_stat_activity several times a second) is not the workers' cost.
            "cpu_s": cpu_s,
            "sampler_cpu_s": sampler_s,
            "cpu_us_per_event": cpu_s / events * 1e6,
            "window_s": window_s,
            "cpu_by_kind": by_kind,
            # Less what the workers cost the primary with no events (presence writes, re-checks) over as long.
            "net_cpu_us_per_event": max(0.0, cpu_s - idle["cpu_share"] * window_s) / events * 1e6,
            "worker_cpu_s": workers_after - workers_before,
            "machine_busy": busy,
            "wal_bytes": delta["wal"],
            "wal_bytes_per_event": delta["wal"] / events,
            "event_rows_read_per_event": delta["event_rows_read"] / events,
            "event_scans_per_event": delta["event_scans"] / events,
            "tup_returned_per_event": delta["tup_returned"] / events,
            "tup_fetched_per_event": delta["tup_fetched"] / events,
            "xact_per_event": delta["xact_commit"] / events,
            "notifies": len(answer["commits"]),
            "queue_peak": watched["queue_peak"],
            "slowest_worker": slowest,
            "slowest_p50_ms": _percentile(per_worker.get(slowest, []), 0.5),
            "slowest_p99_ms": _percentile(per_worker.get(slowest, []), 0.99),
            "p50_ms": _percentile(all_latencies, 0.5),
            "p99_ms": _percentile(all_latencies, 0.99),
            "max_ms": max(all_latencies, default=math.nan),
            "connections": _summary(watched["peak"]),
        }

    def replays(self, n: int, servers: list[Any], client: Any, last_id: int) -> dict[str, Any]:
        """A burst of ``replays_per_worker`` reconnections per worker, each replaying its user's events."""
        from bench import dbsetup
        from bench.loadclient import source_address

        sizes = self.sizes
        client.set_mode("idle")
        count = n * sizes.replays_per_worker
        owners = self.users[:count]
        tokens = dbsetup.mint_tokens(owners, TOKEN_LIFETIME)
        first = n * sizes.per_worker
        specs = [
            (
                servers[i % n].ports[0],
                source_address(first + i),
                "",
                json.dumps({"type": "auth", "token": t, "last_id": last_id}),
            )
            for i, t in enumerate(tokens)
        ]
        pids = [s.process.pid for s in servers]
        with self.sampler.watch(pids, hz=8) as watched:
            joined = client.connect(specs, concurrency=sizes.concurrency, timeout=sizes.wait_timeout, budget=120)
            time.sleep(0.5)
        return {
            "count": count,
            "ok": joined.ok,
            "seconds": joined.finished - joined.started,
            "ended": time.monotonic(),
            **_summary(watched["peak"]),
        }


def _create_database(server_url: str, name: str) -> str:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    with psycopg.connect(server_url, autocommit=True) as connection:
        if not connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            connection.execute(f'CREATE DATABASE "{name}"')
    return make_conninfo(**{**conninfo_to_dict(server_url), "dbname": name})


# The report.


def _fmt(value: Any, digits: int = 0) -> str:
    if not isinstance(value, int | float) or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:,.{digits}f}"


def _ratio(value: float, base: float) -> str:
    if not base or math.isnan(base) or math.isnan(value):
        return "—"
    return f"{value / base:.2f}x"


def markdown(results: dict[str, Any], machine: dict[str, Any] | None = None) -> str:
    """Return scaling.md: the method, the table per (rate, workers), the connection counts and the notes."""
    sizes = results["sizes"]
    lines = ["# Benchmark (g): one PostgreSQL, more and more workers", ""]
    if machine:
        lines.append(
            f"Machine: {machine.get('cores')} cores ({machine.get('cpu')}), "
            f"{machine.get('memory_bytes', 0) / 2**30:.0f} GiB, Python {machine.get('python')}, "
            f"PostgreSQL {results.get('postgresql')}, {machine.get('date')}. Load average at start "
            f"{', '.join(f'{x:.2f}' for x in results['load_average_at_start'])}, at end "
            f"{', '.join(f'{x:.2f}' for x in results.get('load_average_at_end', []))}; "
            f"run took {results.get('duration_s', 0) / 60:.1f} min."
        )
        lines.append("")
    lines += [
        f"Each worker is a `runwebsockets` process on a port of its own with {sizes['per_worker']} authenticated "
        f"connections (one user each); each rate runs {sizes['seconds']:g} s, each event to one connected user "
        "(every worker receives it, one delivers it). PostgreSQL is a server of this run's own (nothing else uses "
        "it); primary CPU is its processes' utime + stime over the window, divided by the events published. Rows "
        "read are `realtime_event`'s `seq_tup_read + idx_tup_fetch`; transactions are `pg_stat_database.xact_commit` "
        "(the workers' reads are autocommit statements: about one query each). Latency is from the publisher's "
        'COMMIT to the receipt, at the worker with the highest p99. "vs 1" divides by the same rate\'s value '
        "with 1 worker.",
        "",
        "| Rate (events/s) | Publishing | Workers | Primary CPU µs/event | vs 1 | Net of idle | vs 1 | "
        "Rows read/event | Transactions/event | WAL bytes/event | NOTIFYs/s | Queue peak | "
        "Slowest worker p50 ms | p99 ms | p99 vs 1 | Received | Achieved rate/s | Machine busy | "
        "DB connections/worker (peak) |",
        "|" + "---|" * 19,
    ]
    points = results["points"]
    base = {(p["rate"], p["batch"]): p for p in points if p["workers"] == min(sizes["workers"])}
    for rate, batch in sizes["rates"]:
        for p in (p for p in points if (p["rate"], p["batch"]) == (rate, batch)):
            b = base.get((rate, batch), p)
            publishing = "publish() each" if batch == 1 else f"publish_many() of {batch}"
            lines.append(
                f"| {rate:,} | {publishing} ({p['mode']}) | {p['workers']} | {_fmt(p['cpu_us_per_event'])} | "
                f"{_ratio(p['cpu_us_per_event'], b['cpu_us_per_event'])} | {_fmt(p['net_cpu_us_per_event'])} | "
                f"{_ratio(p['net_cpu_us_per_event'], b['net_cpu_us_per_event'])} | "
                f"{_fmt(p['event_rows_read_per_event'], 1)} | {_fmt(p['xact_per_event'], 2)} | "
                f"{_fmt(p['wal_bytes_per_event'])} | {_fmt(p['notifies'] / sizes['seconds'])} | "
                f"{p['queue_peak']:.1e} | {_fmt(p['slowest_p50_ms'], 2)} | {_fmt(p['slowest_p99_ms'], 2)} | "
                f"{_ratio(p['slowest_p99_ms'], b['slowest_p99_ms'])} | {p['received']:,}/{p['published']:,} | "
                f"{_fmt(p['achieved_rate'])} | {p['machine_busy']:.0%} | {p['connections']['max_per_worker']} |"
            )
    lines += _floor_tables(results)
    lines += [
        "",
        '"Net of idle" subtracts what the primary spends with the same clients connected and no event '
        "(measured per worker count over a few seconds: presence writes, session re-checks), for as long as the "
        "window.",
        "",
        "| Workers | Primary CPU with no events (share of a core) | Transactions/s | WAL bytes/s |",
        "|---|---|---|---|",
    ]
    for n in sizes["workers"]:
        idle = results["workers"].get(str(n), {}).get("idle")
        if idle:
            lines.append(
                f"| {n} | {idle['cpu_share']:.1%} | {_fmt(idle['xact_per_s'], 1)} | {_fmt(idle['wal_per_s'])} |"
            )
    lines += [
        "",
        "## Database connections per worker",
        "",
        "The most any one worker held (listener / logins `realtime-auth` / Django's threads / in all), "
        "from `pg_stat_activity` matched to each worker's sockets:",
        "",
        "| Workers | At rest (no client) | During the login burst | After it | During the rate windows | "
        "During replays | Just after | Later, with clients connected and idle | All workers at their peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(summary: dict[str, Any]) -> str:
        apps = summary["by_app_max"]
        return f"{apps['realtime-listener']} / {apps['realtime-auth']} / {apps['django']} / {summary['max_per_worker']}"

    for n in sizes["workers"]:
        entry = results["workers"].get(str(n))
        if not entry:
            continue
        windows = [p["connections"] for p in points if p["workers"] == n]
        busiest = max(windows, key=lambda c: c["max_per_worker"]) if windows else entry["after_logins"]
        peak_total = max(
            [entry["logins"]["total"], entry["replays"]["total"], *(c["total"] for c in windows)], default=0
        )
        later = entry.get("rested")
        rested = f"{cell(later)} ({later['seconds_after_last_burst']:.0f} s after)" if later else "—"
        lines.append(
            f"| {n} | {cell(entry['at_rest'])} | {cell(entry['logins'])} | {cell(entry['after_logins'])} | "
            f"{cell(busiest)} | {cell(entry['replays'])} | {cell(entry['end'])} | {rested} | {peak_total} |"
        )
    lines += [
        "",
        "Notes:",
        "",
        '- The machine is shared: other sessions\' tests ran at the same time. "Machine busy" is the whole '
        "machine's CPU use during the window (this run's workers, PostgreSQL, clients and publisher included); "
        "compare ratios within one run rather than absolute values across runs.",
        "- Every worker, its clients, the publisher and PostgreSQL share the machine's cores: with many workers "
        "at high rates the machine saturates and latency then measures the queueing, not the design.",
        "- Rows read per event include the publishing transaction's own (its commit trigger looks up the rows it "
        "numbers: about 5 per event with one worker); the workers add about one per event each when a transaction's "
        "events did not fit in its NOTIFY, none when they did.",
        "- Latency counts from the moment the publisher had the COMMIT's answer; a saturated machine may run a "
        "worker and a client before the publisher gets the CPU back, hence a p50 slightly below zero.",
        '- "All workers at their peak" adds up each worker\'s most connections over the run.',
    ]
    return "\n".join(lines) + "\n"


def _per_commit(point: dict[str, Any], kind: str, per_process: bool = True) -> float:
    """µs of the primary's CPU per commit spent by the processes of ``kind`` (per process, or all of them)."""
    kinds = point["cpu_by_kind"]
    processes = kinds["processes"][kind] if per_process else 1
    if not processes or not point["commits"]:
        return math.nan
    return kinds["seconds"][kind] / point["commits"] / processes * 1e6


def _floor_tables(results: dict[str, Any]) -> list[str]:
    """The workers against the floor (bare LISTEN processes, same rates, same run), and where the CPU goes."""
    sizes = results["sizes"]
    points, floor = results["points"], results.get("floor", [])
    if not floor:
        return []
    floors = {(f["rate"], f["batch"], f["workers"]): f for f in floor}
    first = min(sizes["workers"])
    lines = [
        "",
        "## Against the floor: bare listeners on the same PostgreSQL",
        "",
        "Right after each worker count's windows, the same rates (same publisher, same events and payloads, "
        f"{sizes.get('floor_seconds', 0):g} s each) with as many processes as there were workers, each holding "
        "one connection that LISTENs on the workers' channel and does nothing else (no worker runs). That is "
        'what PostgreSQL charges for the listeners alone: the floor. "LISTEN backend" is the CPU of one '
        "LISTENing connection's backend per commit (`/proc/<pid>/schedstat`): a worker's and a bare "
        "listener's; \"worker's other connections\" adds up a worker's reading, login and Django connections.",
        "",
        "| Rate (events/s) | Per commit | Workers | Ours µs/event | Floor µs/event | Ours / floor | "
        "Ours vs 1 | Floor vs 1 | LISTEN backend µs/commit, a worker's | a bare listener's | "
        "A worker's other connections µs/commit |",
        "|" + "---|" * 11,
    ]
    for rate, batch in sizes["rates"]:
        for p in (p for p in points if (p["rate"], p["batch"]) == (rate, batch)):
            f = floors.get((rate, batch, p["workers"]))
            if not f:
                continue
            ours_1 = next((q for q in points if (q["rate"], q["batch"], q["workers"]) == (rate, batch, first)), p)
            floor_1 = floors.get((rate, batch, first), f)
            others = sum(
                _per_commit(p, kind, per_process=False)
                for kind in ("listener: read", "realtime-auth", "worker: Django")
            ) / max(p["workers"], 1)
            lines.append(
                f"| {rate:,} | {batch} | {p['workers']} | {_fmt(p['cpu_us_per_event'])} | "
                f"{_fmt(f['cpu_us_per_event'])} | {_ratio(p['cpu_us_per_event'], f['cpu_us_per_event'])} | "
                f"{_ratio(p['cpu_us_per_event'], ours_1['cpu_us_per_event'])} | "
                f"{_ratio(f['cpu_us_per_event'], floor_1['cpu_us_per_event'])} | "
                f"{_fmt(_per_commit(p, 'listener: LISTEN'), 1)} | {_fmt(f['listen_us_per_commit'], 1)} | "
                f"{_fmt(others, 1)} |"
            )
    lines += [
        "",
        "## Where the primary's CPU goes",
        "",
        "Per window, each PostgreSQL process's CPU (`/proc/<pid>/schedstat`) by what it serves, matched through "
        "`pg_stat_activity` (a worker's connections by `client_port` and `application_name`; its LISTEN connection "
        "told from its reading one by its last statement), in µs per commit: per worker for a worker's "
        "connections, in all for the rest. The bench's own sampler is left out of every CPU figure above.",
        "",
        "| Rate (events/s) | Per commit | Workers | LISTEN | Reading | Logins | Django | Publisher (all) | "
        "PostgreSQL background (all) | Bench sampler (left out) |",
        "|" + "---|" * 10,
    ]
    for rate, batch in sizes["rates"]:
        for p in (p for p in points if (p["rate"], p["batch"]) == (rate, batch)):
            n = max(p["workers"], 1)
            per_worker = [
                _per_commit(p, kind, per_process=False) / n
                for kind in ("listener: LISTEN", "listener: read", "realtime-auth", "worker: Django")
            ]
            in_all = [_per_commit(p, kind, per_process=False) for kind in ("publisher", "background", "bench sampler")]
            lines.append(
                f"| {rate:,} | {batch} | {p['workers']} | " + " | ".join(_fmt(v, 1) for v in per_worker + in_all) + " |"
            )
    return lines


def draw(results: dict[str, Any], path: Path) -> None:
    """Draw scaling.png: primary CPU per event and connections per worker against workers, a line per rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = results["sizes"]
    figure, (cpu_axes, conn_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    for rate, batch in sizes["rates"]:
        points = sorted(
            (p for p in results["points"] if (p["rate"], p["batch"]) == (rate, batch)), key=lambda p: p["workers"]
        )
        label = f"{rate:,}/s, {batch} per commit ({mode_of(batch)})"
        line = cpu_axes.plot(
            [p["workers"] for p in points], [p["cpu_us_per_event"] for p in points], marker="o", label=label
        )[0]
        floor = sorted(
            (f for f in results.get("floor", []) if (f["rate"], f["batch"]) == (rate, batch)),
            key=lambda f: f["workers"],
        )
        if floor:
            cpu_axes.plot(
                [f["workers"] for f in floor],
                [f["cpu_us_per_event"] for f in floor],
                ls=":",
                marker=".",
                color=line.get_color(),
                label=f"{rate:,}/s, {batch} per commit: floor (bare LISTEN processes)",
            )
        conn_axes.plot(
            [p["workers"] for p in points],
            [p["connections"]["total"] for p in points],
            marker="o",
            label=f"{label}: all workers",
        )
    ns = [int(n) for n in results["workers"]]
    conn_axes.plot(
        ns, [results["workers"][str(n)]["logins"]["total"] for n in ns], marker="s", ls="--", label="login burst"
    )
    conn_axes.plot(
        ns, [results["workers"][str(n)]["replays"]["total"] for n in ns], marker="^", ls="--", label="replay burst"
    )
    for axes in (cpu_axes, conn_axes):
        axes.set_xscale("log", base=2)
        axes.set_xticks(ns, [str(n) for n in ns])
        axes.set_xlabel("worker processes")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=7)
    cpu_axes.set_ylabel("primary CPU per event (µs)")
    cpu_axes.set_title("PostgreSQL CPU per event")
    conn_axes.set_ylabel("PostgreSQL connections (all workers, peak)")
    conn_axes.set_title("Connections held by the workers")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _us_per_event(point: dict[str, Any], kind: str, where: str = "cpu_by_kind") -> float:
    """µs per event of all the processes of ``kind``, on the primary or (``replica_cpu_by_kind``) the replica."""
    kinds = point.get(where)
    if not kinds:
        return math.nan
    return kinds["seconds"][kind] / max(point["published"], 1) * 1e6


# A worker's own connections to a server (its LISTEN, reading, login and Django connections).
WORKER_KINDS = ("listener: LISTEN", "listener: read", "realtime-auth", "worker: Django")


def exited_us_per_event(point: dict[str, Any]) -> float:
    """The primary's CPU per event not attributed to a live process: processes that exited during the window
    (autovacuum workers, closed connections: their whole life is counted when they are reaped)."""
    live = sum(s for kind, s in point["cpu_by_kind"]["seconds"].items() if kind != "bench sampler")
    return point["cpu_us_per_event"] - live / max(point["published"], 1) * 1e6


def without_replication(point: dict[str, Any]) -> float:
    """The primary's CPU per event less its walsender's: what it costs with no replica attached."""
    return point["cpu_us_per_event"] - _us_per_event(point, "walsender")


def markdown_replica(results: dict[str, Any], machine: dict[str, Any] | None = None) -> str:
    """Return scaling-replica.md: the same windows with the workers reading from the primary and from the replica."""
    sizes = results["sizes"]
    points = results["points"]
    lines = ["# Benchmark (g), replica reads: the workers read the outbox from a streaming replica", ""]
    if machine:
        lines += [
            f"Machine: {machine.get('cores')} cores ({machine.get('cpu')}), "
            f"{machine.get('memory_bytes', 0) / 2**30:.0f} GiB, Python {machine.get('python')}, "
            f"PostgreSQL {results.get('postgresql')}, {machine.get('date')}. Load average at start "
            f"{', '.join(f'{x:.2f}' for x in results['load_average_at_start'])}, at end "
            f"{', '.join(f'{x:.2f}' for x in results.get('load_average_at_end', []))}; "
            f"run took {results.get('duration_s', 0) / 60:.1f} min.",
            "",
        ]
    lines += [
        "`python -m bench.scaling --replica`. The run's PostgreSQL (the primary, TCP on loopback) gets a streaming "
        "replica made with `pg_basebackup -R -X stream` (pgserver's binaries; hot standby, TCP on loopback, a port "
        "of its own; stopped at the end). Each worker count runs twice, in alternating order: the workers reading "
        'from the primary (as in the full (g) run), and with `REALTIME["READ_DATABASE"]` naming the replica '
        "(they LISTEN on the primary and read the outbox and replays from the replica). Each phase has its own "
        f"workers and clients ({sizes['per_worker']} per worker, one user each); each rate runs "
        f"{sizes['seconds']:g} s, each event to one connected user (every worker receives it, one delivers it).",
        "",
        "Primary CPU is its processes' CPU over the window (`/proc/<pid>/schedstat`, exited children included, "
        "the bench's sampler left out) per event published; it includes the walsender that streams to the "
        'replica, which runs through both kinds of phase, so "without the walsender" is the primary\'s cost with '
        "no replica attached. Replica CPU is the replica's processes' alike (its WAL replay and receiver "
        "included); \"workers' reads\" is its backends serving the workers. Rows read are `realtime_event`'s "
        "`seq_tup_read + idx_tup_fetch` on each server (on the primary they include the publishing commits' own, "
        "about 5 per event). Latency is from the publisher's COMMIT to the receipt, at the worker with the "
        'highest p99. "vs 1" divides by the same rate and reads with 1 worker.',
        "",
        "| Rate (events/s) | Publishing | Workers | Reads from | Primary CPU µs/event | vs 1 | Without the "
        "walsender | vs 1 | Walsender µs/event | Publisher µs/event | Exited processes µs/event | "
        "LISTEN backend µs/commit per worker | Worker connections on the "
        "primary, reading and Django µs/event (all) | Replica CPU µs/event | of which the workers' reads | "
        "Rows read/event, primary | replica | Slowest worker p50 ms | p99 ms | Received | Lost / duplicates | "
        "Machine busy |",
        "|" + "---|" * 22,
    ]
    first = min(sizes["workers"])
    base = {(p["rate"], p["batch"], p["reads"]): p for p in points if p["workers"] == first}
    for rate, batch in sizes["rates"]:
        for read in ("primary", "replica"):
            for p in sorted(
                (p for p in points if (p["rate"], p["batch"], p["reads"]) == (rate, batch, read)),
                key=lambda p: p["workers"],
            ):
                b = base.get((rate, batch, read), p)
                publishing = "publish() each" if batch == 1 else f"publish_many() of {batch}"
                reading = _us_per_event(p, "listener: read") + _us_per_event(p, "worker: Django")
                on_replica = _us_per_event(p, "listener: read", "replica_cpu_by_kind") + _us_per_event(
                    p, "worker: Django", "replica_cpu_by_kind"
                )
                lines.append(
                    f"| {rate:,} | {publishing} ({p['mode']}) | {p['workers']} | {read} | "
                    f"{_fmt(p['cpu_us_per_event'], 1)} | {_ratio(p['cpu_us_per_event'], b['cpu_us_per_event'])} | "
                    f"{_fmt(without_replication(p), 1)} | {_ratio(without_replication(p), without_replication(b))} | "
                    f"{_fmt(_us_per_event(p, 'walsender'), 1)} | {_fmt(_us_per_event(p, 'publisher'), 1)} | "
                    f"{_fmt(exited_us_per_event(p), 1)} | {_fmt(_per_commit(p, 'listener: LISTEN'), 1)} | "
                    f"{_fmt(reading, 1)} | {_fmt(p.get('replica_cpu_us_per_event'), 1)} | {_fmt(on_replica, 1)} | "
                    f"{_fmt(p['event_rows_read_per_event'], 1)} | "
                    f"{_fmt(p.get('replica_event_rows_read_per_event'), 1)} | "
                    f"{_fmt(p['slowest_p50_ms'], 2)} | {_fmt(p['slowest_p99_ms'], 2)} | "
                    f"{p['received']:,}/{p['published']:,} | {p['lost']} / {p['duplicates']} | "
                    f"{p['machine_busy']:.0%} |"
                )
    last = max(sizes["workers"])
    lines += [
        "",
        f"## {last} workers against {first}",
        "",
        f"The primary's CPU per event with {last} workers divided by its CPU per event with {first}, same run; "
        "primary reads without the walsender (no replica attached), replica reads with it (the replica's cost to "
        "the primary included). Latency: the slowest worker's, replica reads against primary reads at the same "
        "worker count. The last two columns: the primary's CPU in the workers' own connections (LISTEN, reading, "
        "logins, Django), all workers together; the rest of the primary's CPU is the publisher's (which grows with "
        "the listeners it signals, and is the noisiest part on a shared machine), the walsender's and background.",
        "",
        f"| Rate (events/s) | Publishing | Primary reads: µs/event, {first} → {last} | ratio | Replica reads: "
        f"µs/event, {first} → {last} | ratio | p50 ms, primary → replica reads ({first} / {last} workers) | "
        f"p99 ms, primary → replica reads ({first} / {last} workers) | The workers' own connections on the "
        f"primary, µs/event, {first} → {last}: primary reads | replica reads |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    find = {(p["rate"], p["batch"], p["reads"], p["workers"]): p for p in points}
    for rate, batch in sizes["rates"]:
        cells = []
        pr1, pr_n = find.get((rate, batch, "primary", first)), find.get((rate, batch, "primary", last))
        re1, re_n = find.get((rate, batch, "replica", first)), find.get((rate, batch, "replica", last))
        if not (pr1 and pr_n and re1 and re_n):
            continue
        a1, an = without_replication(pr1), without_replication(pr_n)
        cells.append(f"{_fmt(a1, 1)} → {_fmt(an, 1)} | {_ratio(an, a1)}")
        cells.append(f"{_fmt(re1['cpu_us_per_event'], 1)} → {_fmt(re_n['cpu_us_per_event'], 1)} | ")
        cells[-1] += _ratio(re_n["cpu_us_per_event"], re1["cpu_us_per_event"])
        for key in ("slowest_p50_ms", "slowest_p99_ms"):
            cells.append(f"{_fmt(pr1[key], 2)} → {_fmt(re1[key], 2)} / {_fmt(pr_n[key], 2)} → {_fmt(re_n[key], 2)}")
        for pair in ((pr1, pr_n), (re1, re_n)):
            own = [sum(_us_per_event(p, kind) for kind in WORKER_KINDS) for p in pair]
            cells.append(f"{_fmt(own[0], 1)} → {_fmt(own[1], 1)}")
        publishing = "publish() each" if batch == 1 else f"publish_many() of {batch}"
        lines.append(f"| {rate:,} | {publishing} ({mode_of(batch)}) | " + " | ".join(cells) + " |")
    lost = sum(p["lost"] for p in points)
    duplicates = sum(p["duplicates"] for p in points)
    lines += [
        "",
        f"Delivery: {sum(p['received'] for p in points):,} of {sum(p['published'] for p in points):,} events "
        f"received, {lost} lost, {duplicates} duplicated (each event counted at its one connection).",
        "",
        "Notes:",
        "",
        "- The machine is shared (2 cores here): the workers, both PostgreSQL servers, the clients and the "
        "publisher share it, and other sessions' tests ran at the same time. Compare within this run; the full "
        "(g) run's notes on noise apply (16-vs-1 ratios moved by up to 1.3 between runs an hour apart).",
        "- With replica reads the replica applies every commit's WAL before a worker can read it: a worker woken "
        "by a NOTIFY that names a position the replica has not shown yet asks again after 1, 2, 4 ... ms "
        '(docs/delivery.md, "Replica reads"). That wait is in the replica reads\' latency.',
    ]
    return "\n".join(lines) + "\n"


def draw_replica(results: dict[str, Any], path: Path) -> None:
    """Draw scaling-replica.png: primary CPU per event and the slowest worker's p99 against workers, per read mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = results["sizes"]
    figure, (cpu_axes, p99_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    for rate, batch in sizes["rates"]:
        color = None
        for read, style in (("primary", "-"), ("replica", "--")):
            points = sorted(
                (p for p in results["points"] if (p["rate"], p["batch"], p["reads"]) == (rate, batch, read)),
                key=lambda p: p["workers"],
            )
            label = f"{rate:,}/s, {batch} per commit ({mode_of(batch)}), reads from the {read}"
            ns = [p["workers"] for p in points]
            cpu = [without_replication(p) if read == "primary" else p["cpu_us_per_event"] for p in points]
            line = cpu_axes.plot(ns, cpu, ls=style, marker="o", color=color, label=label)[0]
            color = line.get_color()
            p99_axes.plot(ns, [p["slowest_p99_ms"] for p in points], ls=style, marker="o", color=color, label=label)
    ns = list(sizes["workers"])
    for axes in (cpu_axes, p99_axes):
        axes.set_xscale("log", base=2)
        axes.set_xticks(ns, [str(n) for n in ns])
        axes.set_xlabel("worker processes")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=7)
    cpu_axes.set_ylabel("primary CPU per event (µs)")
    cpu_axes.set_title("The primary's CPU per event (replica reads: walsender included)")
    p99_axes.set_ylabel("commit → receipt p99 at the slowest worker (ms)")
    p99_axes.set_title("Latency")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write(results: dict[str, Any], out_dir: Path, *, plot: bool = True) -> None:
    """Write scaling.json, .md and (``plot``) .png to ``out_dir`` (``scaling-replica.*`` for --replica)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    replica = bool(results["sizes"].get("replica"))
    stem = "scaling-replica" if replica else "scaling"
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    report = markdown_replica if replica else markdown
    (out_dir / f"{stem}.md").write_text(report(results, results["machine"]))
    if plot:
        (draw_replica if replica else draw)(results, out_dir / f"{stem}.png")


def run(sizes: ScalingSizes = FULL, out_dir: Path = RESULTS_DIR, *, plot: bool = True, quiet: bool = False) -> int:
    """Run (g) with ``sizes``, write its results to ``out_dir``; return an exit status (0: every event arrived)."""

    def say(text: str) -> None:
        if not quiet:
            elapsed = int(time.monotonic() - began)
            print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {text}", file=sys.stderr, flush=True)

    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="realtime-scaling-"))
    work.chmod(0o755)  # pgserver's user must reach the data directory inside
    try:
        results = Scaling(sizes, work, say).run()
        write(results, out_dir, plot=plot)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stem = "scaling-replica" if sizes.replica else "scaling"
    say(f"(g) results: {out_dir / (stem + '.md')} ({results['duration_s'] / 60:.1f} min)")
    complete = all(p["lost"] == 0 and p["duplicates"] == 0 for p in results["points"])
    return 0 if complete else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.scaling``: run workload (g) alone."""
    parser = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where to write scaling.md, .json and .png")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds), for checking the harness")
    parser.add_argument("--quick", action="store_true", help="1, 4 and 16 workers, 3 s per rate")
    parser.add_argument("--workers", help="comma-separated worker counts (default 1,2,4,8,16)")
    parser.add_argument("--no-plot", action="store_true", help="do not draw scaling.png (no matplotlib needed)")
    parser.add_argument(
        "--replica",
        action="store_true",
        help="replica reads: 1, 4 and 16 workers at 5,000/s in commits of 16 and of 100, each reading from the "
        "primary and from a streaming replica (READ_DATABASE); writes scaling-replica.md, .json and .png",
    )
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    if args.replica:
        sizes = REPLICA_SMOKE if args.smoke else REPLICA
    if args.quick and not args.smoke:
        sizes = replace(sizes, workers=(1, 4, 16), seconds=3.0)
    if args.workers:
        sizes = replace(sizes, workers=tuple(int(n) for n in args.workers.split(",")))
    from bench.loadclient import raise_nofile_limit

    raise_nofile_limit()
    try:
        return run(sizes, args.out, plot=not args.no_plot)
    except KeyboardInterrupt:
        print("\ninterrupted: every process (g) started was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
