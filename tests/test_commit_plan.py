"""The commit trigger finds its transaction's rows through an index, whatever the table's statistics say.

Statistics taken while the outbox was empty (a prune that emptied it, then an ANALYZE) made the
planner scan the whole table in each of the trigger's statements until autovacuum analyzed it
again: with 40,000 rows, about 40,000 rows read per commit (found by bench (g)'s replica run).
"""

from __future__ import annotations

import psycopg
import pytest

from tests.helpers import database_url_for_tests

pytestmark = pytest.mark.django_db(transaction=True)

SCANS = "SELECT seq_scan, coalesce(idx_scan, 0) FROM pg_stat_user_tables WHERE relname = 'realtime_event'"


def scans(connection: psycopg.Connection) -> tuple[int, int]:
    connection.execute("SELECT pg_stat_clear_snapshot()")
    row = connection.execute(SCANS).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def commit_batch(publisher: psycopg.Connection, size: int) -> None:
    """Commit ``size`` events, written as publish_many() writes them (COPY), and flush this backend's counters."""
    columns = "name, data, created_at, users, groups, permissions, staff, everyone, staff_only, control"
    with publisher.transaction(), publisher.cursor().copy(f"COPY realtime_event ({columns}) FROM STDIN") as copy:
        for _ in range(size):
            copy.write_row(("plan", "{}", "2026-12-01T00:00:00+00:00", "{1}", "{}", "{}", "f", "f", "f", "f"))
    publisher.execute("SELECT pg_stat_force_next_flush()")
    publisher.execute("SELECT 1")  # the flush happens at the end of a transaction


def test_commits_use_the_indexes_after_statistics_of_an_empty_outbox():
    with (
        psycopg.connect(database_url_for_tests(), autocommit=True) as admin,
        psycopg.connect(database_url_for_tests(), autocommit=True) as publisher,
    ):
        admin.execute("DELETE FROM realtime_event")
        admin.execute("VACUUM ANALYZE realtime_event")  # statistics: an empty table
        for _ in range(20):
            commit_batch(publisher, 100)
        before = scans(admin)
        for _ in range(10):
            commit_batch(publisher, 100)
        after = scans(admin)
        seq_scans = after[0] - before[0]
        assert seq_scans == 0, f"{seq_scans} sequential scans of the outbox in 10 commits of 100 events"
        assert after[1] > before[1]  # the commits did use an index
