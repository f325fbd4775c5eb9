"""The benchmark: the same workloads, the same load client, for each system under test.

Systems: ``ours`` (this project: ``runwebsockets``, events through the outbox);
``floor`` (:mod:`bench.floor`, issue 14: websockets + LISTEN, no auth, no outbox,
no reads: what the report divides this project's numbers by); and, when
installed, Django Channels served by daphne with ``channels_redis``
(``channels-redis``, a local redis-server) or ``channels_postgres``
(``channels-postgres``, the same PostgreSQL). Workloads (issue 6):

a. memory per idle authenticated connection: server RSS growth over
   ``idle`` connections / ``idle`` (after a warm-up and a 3 s settle);
b. fan-out: one event to every one of ``fanout`` connections, from the
   publisher's commit (ours) or ``group_send`` call (Channels) to the moment
   the last client read it; the median of ``fanout_repeats`` events;
c. latency from commit to receipt at ``latency_rate`` events/s, each event to
   one of ``latency_users`` users (one connection each): p50 / p99 / max;
d. the highest publish rate sustained for ``rate_seconds`` with no loss, by
   single events and by batches (see :meth:`Bench.sustained_rate`);
e. new authenticated connections per second, over the first ``idle`` connections;
f. the most connections two server processes hold (up to ``capacity``,
   connecting for at most ``capacity_budget`` seconds), and one event to all.

And, for ``extra_latency_systems`` (this project and the floor; issue 14),
each on a fresh server process of its own:

c'. commit → receipt with ``tabs_users`` users x ``tabs_per_user`` tabs
   (one connection each) at ``tabs_rate`` single-user events/s: every event
   reaches every tab of its user; p50 / p99 / max over every receipt;
c''. commit → receipt on one connection, one event every ``solo_interval``
   seconds, nothing else connected.

(c') and (c'') last ``latency_seconds``. The floor runs (a), (b), (c), (e), (c')
and (c''): it has no publish API to rate (d), and (f) is for the real servers.
For the floor, (e) is plain connections per second (connect, a first message
naming a user id, the server's ack): its "authentication"; (b), (c) are timed
from the return of the publisher's autocommit ``pg_notify`` statement.

Everything is bounded in count and time, starts on loopback, and is stopped
in ``finally`` blocks (servers, clients, publishers, redis), also on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import dbsetup
from bench.agents import AgentPool
from bench.loadclient import ConnectResult, ConnSpec, LoadClient, raise_nofile_limit, source_address
from bench.servers import Server, redis_available, start_daphne, start_floor, start_ours, start_redis

__all__ = ["FULL", "SMOKE", "SYSTEMS", "Sizes", "run"]

BASE_DIR = Path(__file__).resolve().parent.parent
RESULTS_DIR = BASE_DIR / "bench" / "results"
SYSTEMS = ("ours", "floor", "channels-redis", "channels-postgres")
LABELS = {
    "ours": "This project",
    "floor": "Floor",
    "channels-redis": "Channels + Redis",
    "channels-postgres": "Channels + Postgres",
}
TOKEN_LIFETIME = 3000.0  # bench.settings allows 3600 s


@dataclass(frozen=True)
class Sizes:
    """Counts and durations of one run (all bounded)."""

    idle: int = 5_000
    fanout: tuple[int, ...] = (5_000, 10_000)
    fanout_repeats: int = 5
    latency_users: int = 1_000
    latency_rate: float = 500.0
    latency_seconds: float = 10.0
    rate_seconds: float = 30.0
    probe_seconds: float = 4.0
    single_publishers: int = 4
    batch_publishers: int = 2
    batch_size: int = 200
    capacity: int = 50_000
    capacity_workers: int = 2
    capacity_budget: float = 270.0
    capacity_systems: tuple[str, ...] = ("ours", "channels-redis")
    # (c'): users x tabs connections, single-user events at this rate; (c''): one connection.
    tabs_users: int = 100
    tabs_per_user: int = 10
    tabs_rate: float = 250.0
    solo_interval: float = 0.01
    extra_latency_systems: tuple[str, ...] = ("ours", "floor")
    users: int = 5_000
    client_processes: int = 4
    concurrency: int = 50
    # A rate is sustained when every event arrived within this long after publishing stopped.
    drain_ok: float = 2.0
    wait_timeout: float = 30.0
    # Pause after a wave of connections before measuring (presence writes, allocator settling).
    settle: float = 3.0


FULL = Sizes()
SMOKE = Sizes(
    idle=20,
    fanout=(20, 30),
    fanout_repeats=2,
    latency_users=10,
    latency_rate=50.0,
    latency_seconds=1.0,
    rate_seconds=1.0,
    probe_seconds=0.5,
    single_publishers=1,
    batch_publishers=1,
    batch_size=10,
    capacity=40,
    capacity_budget=30.0,
    tabs_users=4,
    tabs_per_user=3,
    tabs_rate=50.0,
    users=40,
    client_processes=2,
    concurrency=10,
    drain_ok=10.0,
    wait_timeout=20.0,
    settle=0.5,
)


class Progress:
    """Progress lines on stderr: one per step, and in-place updates when stderr is a terminal."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()
        self._last_update = 0.0
        self._pending = False

    def _stamp(self) -> str:
        elapsed = int(time.monotonic() - self.started)
        return f"[{elapsed // 60:02d}:{elapsed % 60:02d}]"

    def step(self, text: str) -> None:
        if not self.enabled:
            return
        if self._pending and self.tty:
            sys.stderr.write("\n")
        self._pending = False
        sys.stderr.write(f"{self._stamp()} {text}\n")
        sys.stderr.flush()

    def update(self, text: str) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            sys.stderr.write(f"\r{self._stamp()}   {text}\x1b[K")
            self._pending = True
            sys.stderr.flush()
        elif now - self._last_update >= 5:
            sys.stderr.write(f"{self._stamp()}   {text}\n")
            sys.stderr.flush()
        else:
            return
        self._last_update = now


def _percentile(sorted_values: Sequence[float], fraction: float) -> float:
    if not sorted_values:
        return math.nan
    index = min(len(sorted_values) - 1, max(0, math.ceil(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


def _busy(before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]]) -> float:
    """Return the busiest client process's CPU use between two polls (1.0 = one full core)."""
    fractions = []
    for b, a in zip(before, after, strict=True):
        wall = a["wall"] - b["wall"]
        if wall > 0:
            fractions.append((a["cpu"] - b["cpu"]) / wall)
    return max(fractions, default=0.0)


@dataclass
class System:
    """How to start one system and how its clients authenticate."""

    key: str
    kind: str  # "ours", "channels" or "floor": the server, the clients' first message, the publisher agents
    settings_module: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return LABELS[self.key]


class Bench:
    """One run of the workloads against the systems; results are plain dicts (JSON-ready)."""

    def __init__(self, sizes: Sizes, database_url: str, log_dir: Path, progress: Progress) -> None:
        self.sizes = sizes
        self.database_url = database_url
        self.log_dir = log_dir
        self.progress = progress
        self.users: list[dbsetup.BenchUser] = []
        self.k = itertools.count(1)
        self.k_next = 10_000_000  # k ranges for latency and rate runs start here

    def k_block(self, size: int) -> int:
        """Reserve ``size`` consecutive event keys; return the first."""
        base = self.k_next
        self.k_next += size + 1000
        return base

    # Starting systems.

    def start(self, system: System, workers: int) -> list[Server]:
        """Start ``system`` with ``workers`` server processes (ours: one port; daphne: one port each); return them."""
        if system.kind == "ours":
            return [
                start_ours(self.database_url, self.log_dir, workers=workers, settings_module=system.settings_module)
            ]
        if system.kind == "floor":
            if workers != 1:
                raise ValueError("the floor runs as one process")
            return [start_floor(self.database_url, self.log_dir, system.env["BENCH_FLOOR_CHANNEL"])]
        servers: list[Server] = []
        try:
            for _ in range(workers):
                servers.append(start_daphne(self.database_url, self.log_dir, system.env))
        except BaseException:
            for server in servers:
                server.stop()
            raise
        return servers

    def specs(self, system: System, servers: list[Server], owners: Sequence[dbsetup.BenchUser]) -> list[ConnSpec]:
        """Connection specs for ``owners`` (one connection each), spread over the servers' ports."""
        ports = [port for server in servers for port in server.ports]
        if system.kind == "ours":
            tokens = dbsetup.mint_tokens(list(owners), TOKEN_LIFETIME)
            return [
                (
                    ports[i % len(ports)],
                    source_address(i),
                    "",
                    json.dumps({"type": "auth", "token": token, "last_id": None}),
                )
                for i, token in enumerate(tokens)
            ]
        if system.kind == "floor":  # no authentication: the first message names the user
            return [
                (ports[i % len(ports)], source_address(i), "", json.dumps({"user": owner.id}))
                for i, owner in enumerate(owners)
            ]
        return [
            (ports[i % len(ports)], source_address(i), f"Cookie: sessionid={owner.session_key}", None)
            for i, owner in enumerate(owners)
        ]

    def owners(self, start: int, count: int) -> list[dbsetup.BenchUser]:
        """Connection owners ``start`` .. ``start + count``: bench users, round robin."""
        return [self.users[i % len(self.users)] for i in range(start, start + count)]

    def connect(
        self,
        system: System,
        servers: list[Server],
        client: LoadClient,
        owners: Sequence[dbsetup.BenchUser],
        what: str,
        budget: float = 600.0,
        first_index: int = 0,
    ) -> ConnectResult:
        """Open one connection per owner (tokens minted now for ours); print and return the outcome.

        ``first_index`` continues the source-address numbering of connections already open.
        """
        specs = self.specs(system, servers, owners)
        if first_index:
            specs = [(p, source_address(first_index + i), h, f) for i, (p, _, h, f) in enumerate(specs)]
        total = len(specs)
        started = time.monotonic()

        def on_progress(ok: int, failed: int) -> None:
            elapsed = max(time.monotonic() - started, 1e-6)
            self.progress.update(f"{what}: {ok:,}/{total:,} connected, {failed:,} failed ({ok / elapsed:,.0f}/s)")

        result = client.connect(
            specs,
            concurrency=self.sizes.concurrency,
            timeout=self.sizes.wait_timeout,
            budget=budget,
            on_progress=on_progress,
        )
        failures = ", ".join(f"{n:,} {reason}" for reason, n in result.failures.most_common(4)) or "none"
        self.progress.step(
            f"  {what}: {result.ok:,}/{total:,} in {result.finished - result.started:.1f}s "
            f"({result.rate:,.0f}/s); failures: {failures}"
        )
        return result

    # Workloads.

    def fanout_series(self, agents: AgentPool, client: LoadClient, repeats: int, what: str) -> dict[str, Any]:
        """Publish ``repeats`` events to everyone; time each until the last connection read it."""
        client.set_mode("fanout")
        expected = client.open_count()
        times, complete, counts, duplicates = [], True, [], 0
        series_started = time.monotonic()
        for _ in range(repeats):
            if times and time.monotonic() - series_started > 15:
                break  # slow fan-outs: fewer repeats keep the run bounded
            k = next(self.k)
            t0 = agents.call(0, "fanout", k=k)
            deadline = time.monotonic() + self.sizes.wait_timeout
            while True:
                answers = client.fanout(k)
                count = sum(a["count"] for a in answers)
                if count >= expected or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            counts.append(count)
            duplicates = sum(a["duplicates"] for a in answers)
            last = max((a["last"] for a in answers if a["count"]), default=math.nan)
            if count < expected:
                complete = False
            times.append((last - t0) * 1000)
            self.progress.update(f"{what}: {count:,}/{expected:,} in {times[-1]:,.1f} ms")
            if count < expected:
                break  # it timed out: do not spend the time again
            time.sleep(0.3)
        median = statistics.median(times) if times else math.nan
        self.progress.step(
            f"  {what}: median {median:,.1f} ms to the last of {expected:,} "
            f"({', '.join(f'{t:.0f}' for t in times)} ms){'' if complete else ' INCOMPLETE'}"
        )
        return {
            "recipients": expected,
            "received": counts,
            "duplicates": duplicates,
            "times_ms": times,
            "median_ms": median,
            "complete": complete,
        }

    def latency(
        self,
        agents: AgentPool,
        client: LoadClient,
        user_ids: list[int],
        *,
        rate: float,
        seconds: float,
        sockets: Mapping[int, int] | None = None,
        what: str = "(c) latency",
    ) -> dict[str, Any]:
        """(c), (c'), (c''): ``rate * seconds`` paced events, event ``i`` to ``user_ids[i % len(user_ids)]``.

        Latency = receipt time - commit time (the publisher's clock after
        COMMIT, ``pg_notify`` or before ``group_send``), one sample per socket
        that received the event: ``sockets`` maps a user id to how many of its
        connections are open (default one each), and every one of them should
        get each of its events once. ``received``, ``lost`` and ``duplicates``
        count receipts (one per event with one socket per user); a receipt
        past a user's socket count is a duplicate (a duplicate on one tab and
        a loss on another of the same event would cancel out). ``p99_last_ms``
        is per event, until the last of its user's sockets had it.
        """
        count = int(rate * seconds)
        k_base = self.k_block(count)
        client.set_mode("latency")
        before = client.poll()
        agents.send(0, "latency", rate=rate, seconds=seconds, users=user_ids, k_base=k_base, start_at=time.time() + 0.3)

        def tick() -> None:
            received = sum(p["received"] for p in client.poll())
            self.progress.update(f"{what}: {received:,} receipts of {count:,} events")

        commit_times: list[float] = agents.wait_all([0], timeout=seconds * 5 + 60, tick=tick)[0]
        published = len(commit_times)
        wanted = [sockets.get(user_ids[i % len(user_ids)], 1) if sockets else 1 for i in range(published)]
        expected = sum(wanted)
        self._drain(client, expected, what)
        stats = client.stats()
        got = [0] * published
        last = [0.0] * published
        latencies, duplicates = [], 0
        for answer in stats:
            for k, t in answer["pairs"]:
                index = k - k_base
                if not 0 <= index < published:
                    continue
                if got[index] >= wanted[index]:
                    duplicates += 1
                    continue
                got[index] += 1
                last[index] = max(last[index], t)
                latencies.append((t - commit_times[index]) * 1000)
        latencies.sort()
        complete = sorted((last[i] - commit_times[i]) * 1000 for i in range(published) if got[i] == wanted[i])
        span = commit_times[-1] - commit_times[0] if published > 1 else 0.0
        result = {
            "published": published,
            "expected": expected,
            "received": len(latencies),
            "duplicates": duplicates,
            "lost": expected - len(latencies),
            "rate": (published - 1) / span if span > 0 else math.nan,
            "p50_ms": _percentile(latencies, 0.50),
            "p99_ms": _percentile(latencies, 0.99),
            "max_ms": latencies[-1] if latencies else math.nan,
            "p99_last_ms": _percentile(complete, 0.99),
            "client_busy": _busy(before, client.poll()),
        }
        self.progress.step(
            f"  {what} at {result['rate']:,.0f}/s: p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, "
            f"max {result['max_ms']:.1f} ms; {result['received']:,}/{expected:,} receipts of {published:,} events"
        )
        return result

    def _drain(self, client: LoadClient, expected: int, what: str, quiet_for: float = 2.0, limit: float = 15.0) -> None:
        """Wait until ``expected`` events arrived, or nothing arrived for ``quiet_for`` s, or ``limit`` s passed."""
        deadline = time.monotonic() + limit
        last_count, last_change = -1, time.monotonic()
        while time.monotonic() < deadline:
            received = sum(p["received"] for p in client.poll())
            if received >= expected:
                return
            if received != last_count:
                last_count, last_change = received, time.monotonic()
            elif time.monotonic() - last_change > quiet_for:
                return
            self.progress.update(f"{what}: draining, {received:,}/{expected:,} received")
            time.sleep(0.05)

    def rate_trial(
        self,
        agents: AgentPool,
        client: LoadClient,
        servers: list[Server],
        user_ids: list[int],
        *,
        publishers: int,
        batch: int,
        seconds: float,
        rate: float | None,
        what: str,
    ) -> dict[str, Any]:
        """(d): publish for ``seconds`` (at ``rate``/s or as fast as possible) and count what arrives."""
        size = int(seconds * 250_000) + publishers * batch
        k_base = self.k_block(size)
        client.set_mode("count", base=k_base, size=size)
        before, cpu_before = client.poll(), sum(s.cpu_seconds() for s in servers)
        start_at = time.time() + 0.3
        for j in range(publishers):
            agents.send(
                j,
                "throughput",
                seconds=seconds,
                users=user_ids,
                k_base=k_base,
                stride=publishers,
                offset=j,
                batch=batch,
                rate=rate / publishers if rate else None,
                start_at=start_at,
            )
        label = f"{rate:,.0f}/s" if rate else "as fast as possible"

        def tick() -> None:
            received = sum(p["received"] for p in client.poll())
            elapsed = max(time.time() - start_at, 1e-6)
            self.progress.update(
                f"{what} ({label}, {seconds:.0f}s): {received:,} received ({received / elapsed:,.0f}/s)"
            )

        answers = agents.wait_all(list(range(publishers)), timeout=seconds + 120, tick=tick)
        published = sum(a["count"] for a in answers)
        started, ended = min(a["start"] for a in answers), max(a["end"] for a in answers)
        self._drain(client, published, what)
        after, cpu_after = client.poll(), sum(s.cpu_seconds() for s in servers)
        stats = client.stats()
        received = sum(s["received"] for s in stats)
        last = max((s["last"] for s in stats if s["last"]), default=ended)
        window = ended - started
        trial = {
            "target_rate": rate,
            "seconds": window,
            "published": published,
            "received": received,
            "lost": published - received,
            "duplicates": sum(s["duplicates"] for s in stats),
            "out_of_range": sum(s["out_of_range"] for s in stats),
            "publish_rate": published / window if window > 0 else 0.0,
            "delivered_rate": received / max(last - started, 1e-6),
            "drain_s": max(0.0, last - ended),
            "server_busy": (cpu_after - cpu_before) / max(after[0]["wall"] - before[0]["wall"], 1e-6),
            "client_busy": _busy(before, after),
        }
        # Duplicates are not loss: they are reported in the notes, not held against the rate.
        # Sustained: nothing lost, and nothing late (a backlog that grows is not sustained): the
        # last event arrived within drain_ok, and within 10 % of a short run's length.
        late = min(self.sizes.drain_ok, 0.1 * seconds + 0.25)
        trial["ok"] = trial["lost"] == 0 and trial["drain_s"] <= late
        self.progress.step(
            f"  {what} ({label}, {window:.0f}s): published {published:,} ({trial['publish_rate']:,.0f}/s), "
            f"received {received:,}, lost {trial['lost']:,}, duplicates {trial['duplicates']:,}, "
            f"last after {trial['drain_s']:.2f}s -> "
            f"{'sustained' if trial['ok'] else 'NOT sustained'}"
        )
        return trial

    def sustained_rate(self, run_trial: Callable[[float, float | None], dict[str, Any]]) -> dict[str, Any]:
        """(d): the highest rate sustained for ``rate_seconds`` with no loss, found in a bounded search.

        First a short probe as fast as the publishers can go. If it passes
        (nothing lost, nothing late), the full-length run is as fast as
        possible too. Otherwise up to 3 more short probes at paced rates narrow
        the highest passing rate: the first at 80 % of what was delivered, then
        70 % of the last rate while none passed, then halfway between the best
        passing and the lowest failing rate, until they are within 15 %. Then
        the full-length run at the best passing rate; if it fails, one more at
        85 % of what it delivered. The result is the publish rate of the
        full-length run that passed, or None.
        """
        sizes = self.sizes
        trials = [run_trial(sizes.probe_seconds, None)]
        passing: float | None = None
        rate: float | None = None
        if not trials[0]["ok"]:
            failing = trials[0]["publish_rate"]
            rate = 0.8 * min(trials[0]["delivered_rate"], failing)
            for _ in range(3):
                trial = run_trial(sizes.probe_seconds, rate)
                trials.append(trial)
                if trial["ok"]:
                    passing = rate
                else:
                    failing = rate
                if passing is None:
                    rate = 0.7 * min(rate, trial["delivered_rate"])
                elif failing / passing < 1.15:
                    break
                else:
                    rate = (passing + failing) / 2
            if passing is None:
                return {"rate": None, "trials": trials}
            rate = passing
        result: float | None = None
        for _ in range(2):
            trial = run_trial(sizes.rate_seconds, rate)
            trials.append(trial)
            if trial["ok"]:
                result = trial["publish_rate"]
                break
            rate = 0.85 * min(trial["delivered_rate"], trial["publish_rate"])
        return {"rate": result, "trials": trials}

    # Phases.

    def main_phase(self, system: System) -> dict[str, Any]:
        """Workloads (a), (b), (e) against one server process, then (c), (d) against a fresh one (the floor: no (d))."""
        sizes = self.sizes
        out: dict[str, Any] = {"notes": []}
        servers = self.start(system, workers=1)
        agent_count = 1 if system.kind == "floor" else max(sizes.single_publishers, sizes.batch_publishers)
        try:
            with (
                LoadClient(sizes.client_processes) as client,
                AgentPool(system.kind, agent_count, system.settings_module, self.database_url, system.env) as agents,
            ):
                # Warm-up: the first connections import and allocate what every later one shares.
                self.connect(system, servers, client, self.owners(0, min(50, sizes.idle)), "warm-up")
                self.close_all(client, servers)
                time.sleep(sizes.settle)
                rss_before = sum(s.rss() for s in servers)
                poll_before = client.poll()
                idle = self.connect(system, servers, client, self.owners(0, sizes.idle), "(a)(e) idle connections")
                out["connect"] = {
                    "requested": idle.requested,
                    "ok": idle.ok,
                    "seconds": idle.finished - idle.started,
                    "rate": idle.rate,
                    "failures": dict(idle.failures),
                    "client_busy": _busy(poll_before, client.poll()),
                }
                cpu_before = sum(s.cpu_seconds() for s in servers)
                time.sleep(sizes.settle)
                idle_cpu = (sum(s.cpu_seconds() for s in servers) - cpu_before) / sizes.settle
                rss_after = sum(s.rss() for s in servers)
                held = client.open_count()
                out["idle"] = {
                    "connections": held,
                    "rss_before": rss_before,
                    "rss_after": rss_after,
                    "bytes_per_connection": (rss_after - rss_before) / held if held else math.nan,
                    "deflate_negotiated": idle.deflate,
                    "idle_cpu": idle_cpu,
                }
                self.progress.step(
                    f"  (a) {held:,} idle: RSS {rss_before / 2**20:,.0f} -> {rss_after / 2**20:,.0f} MiB, "
                    f"{out['idle']['bytes_per_connection'] / 1024:,.1f} KiB per connection "
                    f"(permessage-deflate on {idle.deflate:,})"
                )
                out["fanout"] = {}
                connected = sizes.idle
                for target in sizes.fanout:
                    if target > connected:
                        self.connect(
                            system,
                            servers,
                            client,
                            self.owners(connected, target - connected),
                            f"(b) up to {target:,}",
                            first_index=connected,
                        )
                        connected = target
                    out["fanout"][str(target)] = self.fanout_series(
                        agents, client, sizes.fanout_repeats, f"(b) fan-out to {target:,}"
                    )
                # (c) and (d) on a fresh server process: nothing left over from the connections of (a) and (b)
                # (background work over them, such as this project's session re-checks, is reported in (a)).
                client.close_all()
                for server in servers:
                    server.stop()
                # Nor a backlog: channels_postgres may still hold undelivered fan-out messages,
                # channels_redis the group memberships of every closed connection (for a day).
                self._clear_events(system)
                servers = self.start(system, workers=1)
                time.sleep(sizes.settle / 3)
                owners = self.users[: sizes.latency_users]
                what = "(c) one connection per user" if system.kind == "floor" else "(c)(d) one connection per user"
                joined = self.connect(system, servers, client, owners, what)
                missing = set(joined.failed)
                # Events go only to users who are connected: a failed login is counted in the notes, not as loss.
                user_ids = [owner.id for i, owner in enumerate(owners) if i not in missing]
                out["latency_users"] = len(user_ids)
                time.sleep(sizes.settle / 3)
                out["latency"] = self.latency(
                    agents, client, user_ids, rate=sizes.latency_rate, seconds=sizes.latency_seconds
                )
                self._clear_events()
                # (d) rates each system's own publishing path: the floor has none.
                modes: tuple[tuple[str, int, int], ...] = (
                    ()
                    if system.kind == "floor"
                    else (("single", sizes.single_publishers, 1), ("batched", sizes.batch_publishers, sizes.batch_size))
                )
                for mode, publishers, batch in modes:

                    def trial(
                        seconds: float, rate: float | None, mode: str = mode, p: int = publishers, b: int = batch
                    ) -> dict[str, Any]:
                        result = self.rate_trial(
                            agents,
                            client,
                            servers,
                            user_ids,
                            publishers=p,
                            batch=b,
                            seconds=seconds,
                            rate=rate,
                            what=f"(d) {mode}",
                        )
                        self._clear_events()
                        return result

                    out[f"rate_{mode}"] = {"publishers": publishers, "batch": batch, **self.sustained_rate(trial)}
                self.close_all(client, servers)
        finally:
            for server in servers:
                server.stop()
        return out

    def extra_latency_phase(self, system: System) -> dict[str, Any]:
        """(c') then (c''), each on a fresh server process with only its own connections; return both results.

        (c'): ``tabs_users`` users x ``tabs_per_user`` connections, ``tabs_rate``
        single-user events/s for ``latency_seconds``; (c''): one connection, one
        event every ``solo_interval`` s for ``latency_seconds``. One publisher.
        """
        sizes = self.sizes
        out: dict[str, Any] = {}
        with (
            LoadClient(sizes.client_processes) as client,
            AgentPool(system.kind, 1, system.settings_module, self.database_url, system.env) as agents,
        ):
            tabs = self.users[: sizes.tabs_users] * sizes.tabs_per_user
            out["latency_tabs"] = self._fresh_latency(
                system,
                agents,
                client,
                tabs,
                sizes.tabs_rate,
                f"(c') {sizes.tabs_users:,} users x {sizes.tabs_per_user}",
            )
            out["latency_solo"] = self._fresh_latency(
                system, agents, client, self.users[:1], 1 / sizes.solo_interval, "(c'') one connection"
            )
        return out

    def _fresh_latency(
        self,
        system: System,
        agents: AgentPool,
        client: LoadClient,
        owners: list[dbsetup.BenchUser],
        rate: float,
        what: str,
    ) -> dict[str, Any]:
        """Start a server, open one connection per item of ``owners``, run :meth:`latency` at ``rate``, stop it all."""
        sizes = self.sizes
        self._clear_events(system)
        servers = self.start(system, workers=1)
        try:
            time.sleep(sizes.settle / 3)
            joined = self.connect(system, servers, client, owners, f"{what}: connections")
            failed = set(joined.failed)
            # Events go only to users with a connection; each should reach all of that user's open ones.
            sockets = Counter(owner.id for i, owner in enumerate(owners) if i not in failed)
            user_ids = [user_id for user_id in dict.fromkeys(owner.id for owner in owners) if sockets[user_id]]
            if not user_ids:
                raise RuntimeError(f"{what}: no connection authenticated ({dict(joined.failures)})")
            time.sleep(sizes.settle / 3)
            result = self.latency(
                agents, client, user_ids, rate=rate, seconds=sizes.latency_seconds, sockets=sockets, what=what
            )
            result.update(connections=joined.ok, users=len(user_ids), connect_failures=dict(joined.failures))
            self.close_all(client, servers)
            return result
        finally:
            client.close_all()
            for server in servers:
                server.stop()
            self._clear_events()

    def capacity_phase(self, system: System, workers: int | None = None) -> dict[str, Any]:
        """(f): connect up to ``capacity`` across ``workers`` (two) server processes, then one event to all of them."""
        sizes = self.sizes
        workers = workers or sizes.capacity_workers
        servers = self.start(system, workers=workers)
        try:
            processes = max(sizes.client_processes, math.ceil(sizes.capacity / 12_000))
            with (
                LoadClient(processes) as client,
                AgentPool(system.kind, 1, system.settings_module, self.database_url, system.env) as agents,
            ):
                poll_before = client.poll()
                result = self.connect(
                    system,
                    servers,
                    client,
                    self.owners(0, sizes.capacity),
                    f"(f) up to {sizes.capacity:,} on {workers} processes",
                    budget=sizes.capacity_budget,
                )
                client_busy = _busy(poll_before, client.poll())
                cpu_before = sum(s.cpu_seconds() for s in servers)
                time.sleep(sizes.settle)
                idle_cpu = (sum(s.cpu_seconds() for s in servers) - cpu_before) / sizes.settle
                fanout = self.fanout_series(agents, client, 3, "(f) fan-out to all")
                held = client.open_count()
                rss = sum(s.rss() for s in servers)
                closed = {}
                for answer in client.poll():
                    for code, n in answer["server_closed"].items():
                        closed[code] = closed.get(code, 0) + n
                self.close_all(client, servers)
            return {
                "workers": workers,
                "requested": sizes.capacity,
                "connected": result.ok,
                "held": held,
                "seconds": result.finished - result.started,
                "rate": result.rate,
                "failures": dict(result.failures),
                "server_closed": closed,
                "fanout": fanout,
                "rss": rss,
                "idle_cpu": idle_cpu,
                "client_busy": client_busy,
            }
        finally:
            for server in servers:
                server.stop()

    def close_all(self, client: LoadClient, servers: list[Server], limit: float = 10.0) -> None:
        """Close every connection, then wait (at most ``limit`` s) until the servers are nearly idle."""
        client.close_all()
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            before = sum(s.cpu_seconds() for s in servers)
            time.sleep(0.5)
            busy = (sum(s.cpu_seconds() for s in servers) - before) / 0.5
            if busy < 0.2:
                return
            self.progress.update(f"waiting for the server to settle after closing ({busy:.0%} of a core busy)")

    def _clear_events(self, system: System | None = None) -> None:
        """Empty the outbox and channels_postgres's message table between runs (all delivered by then).

        With ``system`` (only while none of its clients is connected), also empty
        its Redis: channels_redis keeps the group memberships of closed connections for a day.
        """
        from django.db import connection

        redis_url = system.env.get("BENCH_REDIS_URL") if system else None
        if redis_url:
            import redis

            with redis.Redis.from_url(redis_url) as client:
                client.flushall()

        tables = [
            t for t in ("realtime_event", "channels_postgres_message") if t in connection.introspection.table_names()
        ]
        with connection.cursor() as cursor:
            cursor.execute("TRUNCATE " + ", ".join(tables))


def _versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in (
        "Django",
        "websockets",
        "psycopg",
        "channels",
        "daphne",
        "Twisted",
        "channels-redis",
        "channels-postgres",
        "redis",
        "matplotlib",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    binary = redis_available()
    if binary:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            text = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=5).stdout
            found["redis-server"] = next((p.split("=", 1)[1] for p in text.split() if p.startswith("v=")), text.strip())
    return found


def machine() -> dict[str, Any]:
    """Describe this machine: cores, CPU, memory, kernel, Python, PostgreSQL, library versions, date."""
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
    memory = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as info:
        memory = next((int(line.split()[1]) * 1024 for line in info if line.startswith("MemTotal:")), 0)
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_bytes": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": dbsetup.server_version(),
        "versions": _versions(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_at_start": os.getloadavg(),
        "open_files_hard_limit": _open_files_hard_limit(),
    }


def _workers_past_open_files_limit(sizes: Sizes, capacity: dict[str, Any]) -> int | None:
    """How many server processes ``sizes.capacity`` connections need, if the open-files limit kept two short."""
    from realtime.worker.limits import reserved_files

    limit = _open_files_hard_limit()
    if limit is None or capacity["held"] >= sizes.capacity:
        return None
    per_process = limit - reserved_files()
    if per_process * sizes.capacity_workers >= sizes.capacity:
        return None  # not the limit's doing
    return math.ceil(sizes.capacity / per_process)


def _open_files_hard_limit() -> int | None:
    """RLIMIT_NOFILE's hard limit: a server process holds at most this many connections."""
    try:
        import resource
    except ImportError:
        return None
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return None if hard == resource.RLIM_INFINITY else hard


def _migrate_channels_postgres(database_url: str) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "DJANGO_SETTINGS_MODULE": "bench.channels_site.settings",
        "BENCH_CHANNEL_LAYER": "postgres",
    }
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "channels_postgres", "--verbosity", "0"],
        cwd=BASE_DIR,
        env=env,
        check=True,
        timeout=300,
    )


@contextlib.contextmanager
def _redis(log_dir: Path) -> Iterator[Server | None]:
    server = start_redis(log_dir) if redis_available() else None
    try:
        yield server
    finally:
        if server is not None:
            server.stop()


def run(
    sizes: Sizes = FULL,
    systems: Sequence[str] = SYSTEMS,
    out_dir: Path = RESULTS_DIR,
    *,
    database_url: str | None = None,
    plot: bool = True,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run the benchmark and write ``results.json``, ``results.md`` (and ``plot.png``) to ``out_dir``.

    Without ``database_url`` it creates/migrates the ``realtime_bench``
    database and configures Django for it; with one (the smoke test's test
    database), Django must already be configured for that database.
    Systems whose dependencies are missing are skipped with a note. Returns
    the results (also in results.json).
    """
    from bench import report

    began = time.monotonic()
    progress = Progress(show_progress)
    raise_nofile_limit()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Server logs (big: a line per connection) go to a temporary folder, named at the end.
    log_dir = Path(tempfile.mkdtemp(prefix="realtime-bench-logs-"))
    if database_url is None:
        progress.step(f"database: {dbsetup.BENCH_DATABASE} (created and migrated if needed)")
        database_url = dbsetup.bench_database_url()
        dbsetup.configure_django(database_url)
        dbsetup.migrate()
    results: dict[str, Any] = {"sizes": asdict(sizes), "machine": machine(), "systems": {}, "skipped": {}}
    plan = list(systems)
    channels_ok = _channels_installed()
    for key in plan:
        if key.startswith("channels") and not channels_ok:
            results["skipped"][key] = "Channels is not installed (pip install -r requirements-bench.txt)"
        elif key == "channels-redis" and not redis_available():
            results["skipped"][key] = "redis-server not found (apt-get install redis-server)"
    if "channels-postgres" in plan and "channels-postgres" not in results["skipped"]:
        try:
            _migrate_channels_postgres(database_url)
        except (subprocess.SubprocessError, OSError) as exc:
            results["skipped"]["channels-postgres"] = f"channels_postgres does not migrate here: {exc}"
    for key, why in results["skipped"].items():
        progress.step(f"NOTE: skipping {LABELS[key]}: {why}")
    dbsetup.clear_run_data()
    progress.step(f"{sizes.users:,} bench users with one session each")
    bench = Bench(sizes, database_url, log_dir, progress)
    bench.users = dbsetup.prepare_users(sizes.users)
    try:
        with (
            _redis(log_dir)
            if "channels-redis" in plan and "channels-redis" not in results["skipped"]
            else contextlib.nullcontext() as redis
        ):
            for key in plan:
                if key in results["skipped"]:
                    continue
                system = _system(key, redis)
                workloads = "(a), (b), (c), (e)" if system.kind == "floor" else "(a)-(e)"
                progress.step(f"== {system.label}: {workloads} on one server process")
                entry: dict[str, Any] = {"label": system.label}
                results["systems"][key] = entry
                try:
                    entry.update(bench.main_phase(system))
                except Exception as exc:
                    _failed(entry, "error", exc, progress)
                dbsetup.clear_run_data()
                if key in sizes.extra_latency_systems:
                    progress.step(f"== {system.label}: (c') and (c''), each on a fresh server process")
                    try:
                        entry.update(bench.extra_latency_phase(system))
                    except Exception as exc:
                        _failed(entry, "extra_latency_error", exc, progress)
                    dbsetup.clear_run_data()
                if key in sizes.capacity_systems:
                    progress.step(f"== {system.label}: (f) on {sizes.capacity_workers} server processes")
                    try:
                        entry["capacity"] = bench.capacity_phase(system)
                        more = _workers_past_open_files_limit(sizes, entry["capacity"])
                        if more and system.kind == "ours":
                            progress.step(f"== {system.label}: (f) again on {more} processes (open-files limit)")
                            dbsetup.clear_run_data()
                            entry["capacity_more"] = bench.capacity_phase(system, workers=more)
                    except Exception as exc:
                        _failed(entry, "capacity_error", exc, progress)
                    dbsetup.clear_run_data()
                elif system.kind == "floor":
                    entry["capacity_skipped"] = (
                        "(d) and (f) are not run for the floor: it has no publish API to rate, "
                        "and (f) is for the real servers"
                    )
                else:
                    entry["capacity_skipped"] = "not run for this layer, to keep make bench under 20 minutes"
    finally:
        with contextlib.suppress(Exception):
            dbsetup.clear_run_data()
    results["duration_s"] = time.monotonic() - began
    report.write(results, out_dir, plot=plot)
    if show_progress:
        print(report.table(results))
        print("\n" + report.legend(results))
        print(f"\nResults: {out_dir / 'results.md'}  ({results['duration_s'] / 60:.1f} min); server logs: {log_dir}")
    return results


def _failed(entry: dict[str, Any], field: str, exc: Exception, progress: Any) -> None:
    """Record a workload's failure in ``entry[field]``, say so, and drop the connection it may have broken."""
    entry[field] = f"{type(exc).__name__}: {exc}"
    progress.step(f"  ERROR: {entry[field]}")
    _forget_connection()


def _forget_connection() -> None:
    """Close this process's Django connection after a failed workload: the next query opens a new one.

    The failure may have been PostgreSQL dropping it (a restart, a test terminating backends).
    """
    from django.db import connection

    with contextlib.suppress(Exception):
        connection.close()


def _channels_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("channels", "daphne"))


def _system(key: str, redis: Server | None) -> System:
    if key == "ours":
        return System(key, "ours", "bench.settings")
    if key == "floor":
        # A channel of this run's own: other runs and tests may share the PostgreSQL server.
        return System(key, "floor", "", {"BENCH_FLOOR_CHANNEL": f"bench_floor_{secrets.token_hex(4)}"})
    if key == "channels-redis":
        assert redis is not None
        return System(
            key,
            "channels",
            "bench.channels_site.settings",
            {"BENCH_CHANNEL_LAYER": "redis", "BENCH_REDIS_URL": redis.extra["url"]},
        )
    if key == "channels-postgres":
        return System(key, "channels", "bench.channels_site.settings", {"BENCH_CHANNEL_LAYER": "postgres"})
    raise ValueError(f"unknown system {key!r}; choose from {', '.join(SYSTEMS)}")


def scaled(sizes: Sizes, **changes: Any) -> Sizes:
    """Return ``sizes`` with ``changes`` (for --quick runs and tests)."""
    return replace(sizes, **changes)
