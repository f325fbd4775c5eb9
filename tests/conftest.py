"""Fixtures: a real websocket worker process on a free loopback port (helpers: tests/helpers.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.helpers import WorkerProcess, start_worker


@pytest.fixture
def worker(transactional_db: None) -> Iterator[WorkerProcess]:
    """A websocket worker process serving the test database, stopped after the test."""
    process = start_worker()
    try:
        yield process
    finally:
        process.stop()
        if os.environ.get("REALTIME_SHOW_WORKER_LOG"):
            print(process.log())
        if not getattr(process, "keep_log", False):
            process.log_path.unlink(missing_ok=True)
