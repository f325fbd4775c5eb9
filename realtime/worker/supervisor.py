"""Run several websocket workers on one port (``runwebsockets --workers N``).

Each worker is a separate process (``spawn``, so nothing is shared by
accident) with its own listener and registry, bound with ``SO_REUSEPORT`` so
that the kernel spreads new connections across them. Every worker receives
every committed event from PostgreSQL and routes it to its own clients, so an
event reaches the clients of all workers exactly once.

The supervisor restarts a worker that dies (its clients reconnect, to any
worker, and resume), stops all of them on SIGINT or SIGTERM, and gives up if
a worker fails right at start (e.g. the port is taken by another program).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from typing import Any

__all__ = ["run_workers"]

logger = logging.getLogger("realtime.supervisor")

# A worker that exits within this many seconds of starting failed at start.
EARLY_EXIT = 3.0


def _worker_main(host: str, port: int, number: int, keep_open: float, parent_pid: int) -> None:
    """Entry point of a worker process."""
    import django

    django.setup()
    from realtime.worker.server import serve_forever

    try:
        serve_forever(host, port, name=f"worker-{number}", keep_open=keep_open, reuse_port=True, parent_pid=parent_pid)
    except OSError as exc:
        logger.error("worker %d cannot listen on %s:%d: %s", number, host, port, exc.strerror or exc)
        raise SystemExit(1) from None


class _Supervisor:
    def __init__(self, host: str, port: int, count: int, keep_open: float) -> None:
        self.host, self.port, self.count, self.keep_open = host, port, count, keep_open
        self.context = multiprocessing.get_context("spawn")
        self.processes: dict[int, Any] = {}
        self.started_at: dict[int, float] = {}
        self.stopping = False

    def start(self, number: int) -> None:
        process = self.context.Process(
            target=_worker_main,
            args=(self.host, self.port, number, self.keep_open, os.getpid()),
            name=f"realtime-worker-{number}",
        )
        process.start()
        self.processes[number] = process
        self.started_at[number] = time.monotonic()
        logger.info("started worker %d (pid %d)", number, process.pid)

    def stop_all(self, *args: Any) -> None:
        self.stopping = True
        for process in self.processes.values():
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.stop_all)
        signal.signal(signal.SIGINT, self.stop_all)
        for number in range(self.count):
            self.start(number)
        while not self.stopping:
            time.sleep(0.2)
            for number, process in list(self.processes.items()):
                if process.is_alive() or self.stopping:
                    continue
                code = process.exitcode
                if time.monotonic() - self.started_at[number] < EARLY_EXIT and code not in (0, -signal.SIGKILL):
                    logger.error("worker %d failed at start (exit code %s); stopping", number, code)
                    self.stop_all()
                    self._join()
                    return 1
                logger.warning("worker %d (pid %d) exited with %s; restarting it", number, process.pid, code)
                self.start(number)
        self._join()
        return 0

    def _join(self) -> None:
        deadline = time.monotonic() + 15 + self.keep_open
        for process in self.processes.values():
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()


def run_workers(host: str, port: int, count: int, *, keep_open: float = 0.0) -> int:
    """Run ``count`` workers on ``host:port`` until SIGINT/SIGTERM; return an exit status."""
    return _Supervisor(host, port, count, keep_open).run()
