"""``runwebsockets --workers N``: a supervisor and its worker processes."""

from __future__ import annotations

import contextlib
import signal
import time

import psutil

from tests.helpers import WAIT, start_worker

# How long workers may take to notice that their supervisor is gone, and stop.
ORPHAN_EXIT = 10.0


def worker_processes(supervisor: psutil.Process) -> list[psutil.Process]:
    """The supervisor's worker processes (multiprocessing's resource tracker is a child too)."""
    found = []
    for child in supervisor.children():
        try:
            if "multiprocessing.spawn" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:  # gone meanwhile
            pass
    return found


def has_exited(process: psutil.Process) -> bool:
    """True once ``process`` is gone, or a zombie that no one reaps (it was re-parented)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_workers_stop_when_their_supervisor_is_killed(transactional_db):
    """Workers whose supervisor is SIGKILLed exit on their own, instead of serving on beside the next one."""
    supervisor = start_worker(args=("--workers", "2"))
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + WAIT
        while len(workers := worker_processes(psutil.Process(supervisor.process.pid))) < 2:
            assert time.monotonic() < deadline, f"two workers never started:\n{supervisor.log()}"
            time.sleep(0.05)
        assert len(workers) == 2

        supervisor.stop(signal.SIGKILL)
        deadline = time.monotonic() + ORPHAN_EXIT
        while not all(has_exited(worker) for worker in workers):
            assert time.monotonic() < deadline, f"workers still running:\n{supervisor.log()}"
            time.sleep(0.1)
        assert supervisor.log().count("is gone: stopping") == 2, supervisor.log()
    finally:
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
        supervisor.stop(signal.SIGKILL)
        supervisor.log_path.unlink(missing_ok=True)
