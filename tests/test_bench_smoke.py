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


@pytest.mark.timeout(300)
def test_scaling_smoke_counts_every_event_and_every_workers_connections(tmp_path: Path) -> None:
    """Workload (g) at tiny sizes (``python -m bench --workloads g --smoke``): every event once, every measure there."""
    import json
    import subprocess
    import sys

    from bench.scaling import SMOKE as SCALING_SMOKE
    from bench.scaling import mode_of

    command = [sys.executable, "-m", "bench", "--workloads", "g", "--smoke", "--no-plot", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=280, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "scaling.json").read_text())
    points = results["points"]
    assert [(p["workers"], p["rate"], p["batch"]) for p in points] == [
        (n, rate, batch) for n in SCALING_SMOKE.workers for rate, batch in SCALING_SMOKE.rates
    ]
    for point in points:
        assert point["received"] == point["published"] == int(point["rate"] * SCALING_SMOKE.seconds), point
        assert point["lost"] == point["duplicates"] == 0
        assert point["mode"] == mode_of(point["batch"])
        assert point["notifies"] == point["commits"] > 0
        assert point["cpu_s"] > 0 and point["wal_bytes"] > 0 and point["xact_per_event"] > 0
        # Every worker holds its two listener connections while events flow.
        assert point["connections"]["by_app_max"]["realtime-listener"] == 2
        assert point["connections"]["total"] >= 2 * point["workers"]
        # The bench's own sampler is counted apart, and the workers' LISTEN connections are told apart.
        assert point["sampler_cpu_s"] >= 0 and point["cpu_by_kind"]["processes"]["listener: LISTEN"] == point["workers"]
    # Table reads happen only when a transaction's events do not fit in its NOTIFY.
    assert any(p["mode"] == "table read" for p in points) and any(p["mode"] == "NOTIFY payload" for p in points)
    for n in SCALING_SMOKE.workers:
        entry = results["workers"][str(n)]
        assert entry["logins"]["ok"] == n * SCALING_SMOKE.per_worker
        assert entry["replays"]["ok"] == entry["replays"]["count"] == n * SCALING_SMOKE.replays_per_worker
        assert entry["at_rest"]["by_app_max"]["realtime-listener"] == 2
    rested = results["workers"][str(max(SCALING_SMOKE.workers))]["rested"]
    assert rested["by_app_max"]["realtime-listener"] == 2 and rested["seconds_after_last_burst"] >= 1.0
    # The floor: the same rates with as many bare LISTEN processes, each of which got every NOTIFY.
    floor = results["floor"]
    assert [(f["workers"], f["rate"], f["batch"]) for f in floor] == [
        (n, rate, batch) for n in SCALING_SMOKE.workers for rate, batch in SCALING_SMOKE.rates
    ]
    for f in floor:
        assert f["notified_min"] == f["commits"] > 0, f
        assert f["cpu_by_kind"]["processes"]["bare LISTEN"] == f["workers"]
        assert f["listen_us_per_commit"] > 0
    report = (tmp_path / "scaling.md").read_text()
    assert report.count("| publish") == len(points)
    assert "## Against the floor: bare listeners on the same PostgreSQL" in report
    assert not (tmp_path / "scaling.png").exists()


@pytest.mark.timeout(180)
def test_scaling_replica_smoke_reads_from_the_replica_and_delivers_every_event_once(tmp_path: Path) -> None:
    """(g) ``--replica --smoke``: the same windows reading from the primary and from a streaming replica."""
    import json
    import re
    import subprocess
    import sys
    from collections import Counter

    from bench.scaling import REPLICA_SMOKE

    command = [sys.executable, "-m", "bench.scaling", "--replica", "--smoke", "--no-plot", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=160, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "scaling-replica.json").read_text())
    points = results["points"]
    assert sorted((p["workers"], p["rate"], p["batch"], p["reads"]) for p in points) == sorted(
        (n, rate, batch, read)
        for n in REPLICA_SMOKE.workers
        for rate, batch in REPLICA_SMOKE.rates
        for read in ("primary", "replica")
    )
    for point in points:
        assert point["received"] == point["published"] > 0 and point["lost"] == point["duplicates"] == 0, point
        # The replica streams from the primary all along: one walsender there, and its CPU measured apart.
        assert point["cpu_by_kind"]["processes"]["walsender"] == 1
        assert point["replica_cpu_s"] > 0
        table_read = point["mode"] == "table read"
        if point["reads"] == "replica":
            # The worker's reading connection is on the replica; the primary keeps its LISTEN connection only.
            assert point["cpu_by_kind"]["processes"]["listener: read"] == 0
            assert point["cpu_by_kind"]["processes"]["listener: LISTEN"] == point["workers"]
            if table_read:
                assert point["replica_event_rows_read_per_event"] >= point["workers"]
        else:
            assert point["replica_event_rows_read_per_event"] == 0
    report = (tmp_path / "scaling-replica.md").read_text()
    rows_by_reads = Counter(re.findall(r"^\| [\d,]+ \| [^|]+ \| \d+ \| (primary|replica) \|", report, re.M))
    assert rows_by_reads == {"primary": len(points) // 2, "replica": len(points) // 2}
    assert not (tmp_path / "scaling-replica.png").exists()
    # The replica was stopped: no PostgreSQL is left on its port.
    import socket

    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", results["replica"]["port"]), timeout=1):
        pass
