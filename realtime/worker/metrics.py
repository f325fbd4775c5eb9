"""Prometheus metrics of a websocket worker, served at ``/metrics``."""

from __future__ import annotations

import gc
import sys

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

__all__ = ["Metrics"]


class Metrics:
    """The worker's counters and gauges, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge("realtime_connections", "Authenticated connections receiving events.", registry=r)
        self.authentications = Counter(
            "realtime_authentications", "Authentication attempts by outcome.", ["outcome"], registry=r
        )
        self.events = Counter("realtime_events_routed", "Events routed to at least one client.", registry=r)
        self.frames = Counter("realtime_frames_sent", "Event frames sent to clients.", registry=r)
        self.dropped = Counter(
            "realtime_frames_dropped", "Event frames not sent because their client was too slow.", registry=r
        )
        self.slow_closed = Counter(
            "realtime_slow_clients_closed", "Clients closed with 1013 for not keeping up.", registry=r
        )
        self.listener_up = Gauge("realtime_listener_up", "1 while the LISTEN connection is up.", registry=r)
        # Set with set_function() to the listener's lag_seconds() and lag_positions(): with
        # REALTIME["READ_DATABASE"] the replica's lag as this worker feels it, else the primary's (about 0).
        self.replica_lag = Gauge(
            "realtime_replica_lag_seconds",
            "How long the oldest position known to be committed has waited to be read from the read database"
            " (0 when caught up).",
            registry=r,
        )
        self.replica_lag_positions = Gauge(
            "realtime_replica_lag_positions",
            "Positions known to be committed that the read database has not shown yet.",
            registry=r,
        )
        self.lag = Histogram(
            "realtime_commit_to_send_seconds",
            "Time from publish to send, per event.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        # Sizes that must stay flat over weeks (bench/soak.py watches them); the worker sets
        # each with set_function(), so they are read when /metrics is scraped, in the event loop.
        self.worker = Info("realtime_worker", "This worker process: its name and pid.", registry=r)
        self.tasks = Gauge("realtime_asyncio_tasks", "Tasks in the worker's event loop.", registry=r)
        # Python's own allocations: growing with RSS is a leak of objects; RSS alone, fragmentation.
        self.blocks = Gauge(
            "realtime_python_allocated_blocks",
            "Memory blocks allocated by Python (sys.getallocatedblocks()).",
            registry=r,
        )
        self.blocks.set_function(sys.getallocatedblocks)
        # Blocks right after a full collection are the live objects: the rest is garbage waiting for one.
        self.full_collections = Gauge(
            "realtime_gc_full_collections", "Full (generation 2) garbage collections so far.", registry=r
        )
        self.full_collections.set_function(lambda: gc.get_stats()[2]["collections"])
        self.gc_pause = Histogram(
            "realtime_gc_pause_seconds",
            "Pauses of the worker's periodic full garbage collection (realtime.worker.memory).",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
            registry=r,
        )
        self.registry_keys = Gauge(
            "realtime_registry_keys",
            "Keys in the registry's indexes (user, group, permission, topic, session).",
            registry=r,
        )
        self.presence = Gauge(
            "realtime_presence_connections",
            "Connections the presence tracker holds: live (in memory) and written (in the database).",
            ["state"],
            registry=r,
        )

    def render(self) -> bytes:
        """Return the Prometheus text exposition."""
        return generate_latest(self.registry)
