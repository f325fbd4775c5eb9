"""The benchmark harness (``make bench``) at tiny sizes, against this project's server and the floor.

It keeps the harness working in CI: every workload completes and every
message is counted (none lost, none duplicated). It never asserts a timing.
Channels and matplotlib are not installed in CI, and nothing here needs them
(the floor, bench/floor.py, needs only websockets and psycopg).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.dbsetup import current_database_url
from bench.harness import SMOKE, run
from bench.report import rows

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]


def test_bench_smoke_completes_and_counts_every_message(tmp_path: Path) -> None:
    results = run(
        SMOKE, ["ours", "floor"], tmp_path, database_url=current_database_url(), plot=False, show_progress=False
    )
    ours, floor = results["systems"]["ours"], results["systems"]["floor"]
    for system in (ours, floor):
        assert not {"error", "extra_latency_error", "capacity_error"} & set(system), system

    for system in (ours, floor):
        # (a), (e): every connection authenticated (the floor: said hello) and stayed.
        assert system["connect"]["ok"] == SMOKE.idle and not system["connect"]["failures"]
        assert system["idle"]["connections"] == SMOKE.idle

        # (b): each fan-out reached every connection exactly once.
        for size in SMOKE.fanout:
            entry = system["fanout"][str(size)]
            assert entry["recipients"] == size
            assert entry["received"] == [size] * SMOKE.fanout_repeats
            assert entry["complete"] and entry["duplicates"] == 0

        # (c): every paced event arrived once.
        latency = system["latency"]
        assert latency["published"] == int(SMOKE.latency_rate * SMOKE.latency_seconds)
        assert latency["received"] == latency["published"] and latency["lost"] == 0 and latency["duplicates"] == 0

        # (c'): every event reached every tab of its user once; (c''): every event reached the one connection.
        tabs = system["latency_tabs"]
        assert tabs["connections"] == SMOKE.tabs_users * SMOKE.tabs_per_user and tabs["users"] == SMOKE.tabs_users
        assert tabs["published"] == int(SMOKE.tabs_rate * SMOKE.latency_seconds)
        assert tabs["expected"] == tabs["published"] * SMOKE.tabs_per_user
        assert tabs["received"] == tabs["expected"] and tabs["lost"] == 0 and tabs["duplicates"] == 0
        solo = system["latency_solo"]
        assert solo["connections"] == 1 and solo["published"] == round(SMOKE.latency_seconds / SMOKE.solo_interval)
        assert solo["received"] == solo["expected"] == solo["published"] and solo["duplicates"] == 0

    # The floor has no (d) nor (f).
    assert not {"rate_single", "rate_batched", "capacity"} & set(floor) and floor["capacity_skipped"]

    # (d): every event of every trial, single and batched, arrived once.
    for mode in ("single", "batched"):
        trials = ours[f"rate_{mode}"]["trials"]
        assert trials
        for trial in trials:
            assert trial["published"] > 0
            assert trial["received"] == trial["published"]
            assert trial["lost"] == trial["duplicates"] == trial["out_of_range"] == 0

    # (f): two workers held every connection and the fan-out reached all of them.
    capacity = ours["capacity"]
    assert capacity["connected"] == capacity["held"] == SMOKE.capacity
    assert capacity["fanout"]["complete"] and capacity["fanout"]["received"] == [SMOKE.capacity] * 3

    # The report is written, every row with the floor's column; the plot is not (no matplotlib needed).
    report = (tmp_path / "results.md").read_text()
    assert report.count("\n| (") == len(rows(results["sizes"])) - 2  # all but (f) on more processes
    assert "| This project | Floor | cost vs floor | Target met |" in report
    assert (tmp_path / "results.json").exists() and not (tmp_path / "plot.png").exists()
