"""The benchmark harness (``make bench``) at tiny sizes, against this project's server only.

It keeps the harness working in CI: every workload completes and every
message is counted (none lost, none duplicated). It never asserts a timing.
Channels and matplotlib are not installed in CI, and nothing here needs them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.dbsetup import current_database_url
from bench.harness import SMOKE, run

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]


def test_bench_smoke_completes_and_counts_every_message(tmp_path: Path) -> None:
    results = run(SMOKE, ["ours"], tmp_path, database_url=current_database_url(), plot=False, show_progress=False)
    ours = results["systems"]["ours"]
    assert "error" not in ours and "capacity_error" not in ours, ours

    # (a), (e): every connection authenticated and stayed.
    assert ours["connect"]["ok"] == SMOKE.idle and not ours["connect"]["failures"]
    assert ours["idle"]["connections"] == SMOKE.idle

    # (b): each fan-out reached every connection exactly once.
    for size in SMOKE.fanout:
        entry = ours["fanout"][str(size)]
        assert entry["recipients"] == size
        assert entry["received"] == [size] * SMOKE.fanout_repeats
        assert entry["complete"] and entry["duplicates"] == 0

    # (c): every paced event arrived once.
    latency = ours["latency"]
    assert latency["published"] == int(SMOKE.latency_rate * SMOKE.latency_seconds)
    assert latency["received"] == latency["published"] and latency["lost"] == 0 and latency["duplicates"] == 0

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

    # The report is written; the plot is not (no matplotlib needed).
    report = (tmp_path / "results.md").read_text()
    assert report.count("\n| (") == 12
    assert (tmp_path / "results.json").exists() and not (tmp_path / "plot.png").exists()
