"""Turn benchmark results into a Markdown table (ratios to the floor and to Channels), results.md and plot.png.

``table()`` and ``legend()`` are what ``make bench`` prints; ``write()`` writes
``results.json``, ``results.md`` (the machine, the table, the method and the
notes) and, when ``plot`` is true, ``plot.png`` (matplotlib is imported only there).

Two kinds of ratio, both of this project's value on a row:

- to the floor ("cost vs floor"): this project's time or memory ÷ the
  floor's, or the floor's rate or count ÷ this project's: how many times the
  floor's cost this project pays. 1.0x is as cheap as the floor; lower is better;
- to each Channels system: how many times better (or worse) this project is.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Row", "legend", "rows", "table", "write"]

OURS = "ours"
FLOOR = "floor"
CHANNELS = ("channels-redis", "channels-postgres")


@dataclass(frozen=True)
class Row:
    """One line of the table: how to read a value from a system's results, and what "better" means."""

    key: str
    label: str
    unit: str
    lower_is_better: bool
    target: str
    value: Callable[[dict[str, Any]], float | None]
    # Returns True/False when this project's value meets the target (ratios: see met()).
    check: Callable[[float], bool] | None = None
    min_ratio: float | None = None  # also needs this many times better than every Channels system
    optional: bool = False  # left out of the table when no system has a value
    # A remark after a system's value, e.g. the events it lost while its latency was measured.
    remark: Callable[[dict[str, Any]], str] | None = None


def _get(data: dict[str, Any], *path: str) -> Any:
    for part in path:
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value)):
        return float(value)
    return None


def _per_gib(system: dict[str, Any]) -> float | None:
    per = _number(_get(system, "idle", "bytes_per_connection"))
    return 2**30 / per if per and per > 0 else None


def _fanout(size: int) -> Callable[[dict[str, Any]], float | None]:
    def value(system: dict[str, Any]) -> float | None:
        entry = _get(system, "fanout", str(size))
        return _number(entry["median_ms"]) if entry and entry.get("complete") else None

    return value


def _latency_losses(system: dict[str, Any], key: str = "latency") -> str:
    """ " (5 lost)" when some of the latency events never arrived: the percentiles are of those that did."""
    lost = _get(system, key, "lost")
    return f" ({lost:,} lost)" if lost else ""


def _latency_rows(sizes: dict[str, Any]) -> list[Row]:
    """Rows of (c') (users with several tabs) and (c'') (one connection), when the run had them."""
    if "tabs_users" not in sizes:
        return []  # results of a run before issue 14
    users, tabs, rate = sizes["tabs_users"], sizes["tabs_per_user"], sizes["tabs_rate"]
    solo = f"{sizes['solo_interval'] * 1000:g} ms"
    result = []
    for key, name, label in (
        (
            "latency_tabs",
            "c'",
            f"{rate:,.0f} events/s to {users:,} users with {tabs} tabs each ({users * tabs:,} sockets)",
        ),
        ("latency_solo", "c''", f"one connection, one event every {solo}, nothing else running"),
    ):
        stats = [("p50", "p50_ms", f", {label}"), ("p99", "p99_ms", ""), ("max", "max_ms", "")]
        if key == "latency_tabs":
            stats.append(("p99 until the last tab", "p99_last_ms", ""))
        for stat, field, rest in stats:
            result.append(
                Row(
                    f"{name}{stat.split()[0]}{'/last' if 'last' in stat else ''}",
                    f"({name}) Commit → receipt {stat}{rest}",
                    "ms",
                    True,
                    "",
                    lambda s, key=key, field=field: _number(_get(s, key, field)),
                    optional=True,
                    remark=lambda s, key=key: _latency_losses(s, key),
                )
            )
    return result


def _capacity_fanout(system: dict[str, Any], key: str = "capacity") -> float | None:
    entry = _get(system, key, "fanout")
    return _number(entry["median_ms"]) if entry and entry.get("complete") else None


def rows(sizes: dict[str, Any]) -> list[Row]:
    """The table's rows for a run of these sizes."""
    fanouts = sizes.get("fanout") or []
    result = [
        Row(
            "a",
            f"(a) Memory per idle connection, {sizes['idle']:,} connections",
            "KiB",
            True,
            "≤ 16",
            lambda s: (lambda v: v / 1024 if v is not None else None)(_number(_get(s, "idle", "bytes_per_connection"))),
            lambda v: v <= 16,
        ),
        Row("a/GiB", "(a) Idle connections per GiB of server memory", "", False, "≥ 3x Channels", _per_gib, None, 3.0),
    ]
    for size in fanouts:
        target = "≤ 120" if size == 10_000 else ""
        result.append(
            Row(
                f"b{size}",
                f"(b) One event to {size:,} connections, until the last has it",
                "ms",
                True,
                target,
                _fanout(size),
                (lambda v: v <= 120) if size == 10_000 else None,
            )
        )
    rate, users = sizes["latency_rate"], sizes["latency_users"]
    result += [
        Row(
            "c50",
            f"(c) Commit → receipt p50, {rate:,.0f} events/s over {users:,} users",
            "ms",
            True,
            "≤ 1.5",
            lambda s: _number(_get(s, "latency", "p50_ms")),
            lambda v: v <= 1.5,
            remark=_latency_losses,
        ),
        Row(
            "c99",
            "(c) Commit → receipt p99",
            "ms",
            True,
            "≤ 5 and ≥ 10x Channels",
            lambda s: _number(_get(s, "latency", "p99_ms")),
            lambda v: v <= 5,
            10.0,
            remark=_latency_losses,
        ),
        Row(
            "cmax",
            "(c) Commit → receipt max",
            "ms",
            True,
            "",
            lambda s: _number(_get(s, "latency", "max_ms")),
            remark=_latency_losses,
        ),
        *_latency_rows(sizes),
        Row(
            "d1",
            f"(d) Publish rate sustained {sizes['rate_seconds']:.0f} s with no loss, single events",
            "events/s",
            False,
            "≥ 5,000",
            lambda s: _number(_get(s, "rate_single", "rate")),
            lambda v: v >= 5_000,
        ),
        Row(
            "d2",
            f"(d) Same, batched ({sizes['batch_size']} per commit / concurrent sends)",
            "events/s",
            False,
            "≥ 50,000",
            lambda s: _number(_get(s, "rate_batched", "rate")),
            lambda v: v >= 50_000,
        ),
        Row(
            "e",
            "(e) New authenticated connections per second, one process",
            "/s",
            False,
            "≥ 1,000",
            lambda s: _number(_get(s, "connect", "rate")),
            lambda v: v >= 1_000,
        ),
        Row(
            "f",
            f"(f) Connections held by {sizes['capacity_workers']} processes (tried {sizes['capacity']:,})",
            "",
            False,
            f"≥ {sizes['capacity']:,}",
            lambda s: _number(_get(s, "capacity", "held")),
            lambda v: v >= sizes["capacity"],
        ),
        Row(
            "f/fan-out",
            "(f) One event to all of them, until the last has it",
            "ms",
            True,
            "≤ 1,000",
            _capacity_fanout,
            lambda v: v <= 1_000,
        ),
        Row(
            "f/more",
            f"(f) Same, on enough processes for the open-files limit (tried {sizes['capacity']:,})",
            "",
            False,
            "",
            lambda s: _number(_get(s, "capacity_more", "held")),
            optional=True,
        ),
        Row(
            "f/more/fan-out",
            "(f) One event to all of them, until the last has it",
            "ms",
            True,
            "",
            lambda s: _capacity_fanout(s, "capacity_more"),
            optional=True,
        ),
    ]
    return result


def _format(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "ms" and value < 10:
        text = f"{value:.2f}"
    elif unit in ("ms", "KiB") and value < 100:
        text = f"{value:.1f}"
    else:
        text = f"{value:,.0f}"
    return f"{text} {unit}".strip() if unit not in ("", "/s", "events/s") else text


def _ratio(row: Row, ours: float | None, other: float | None) -> float | None:
    if ours is None or other is None or ours <= 0 or other <= 0:
        return None
    return other / ours if row.lower_is_better else ours / other


def _ratio_text(ratio: float | None) -> str:
    if ratio is None:
        return "—"
    return f"{ratio:,.1f}x better" if ratio >= 1 else f"{1 / ratio:,.1f}x worse"


def floor_ratio(row: Row, ours: float | None, floor: float | None) -> float | None:
    """This project's cost in floors: ours ÷ floor for times and memory, floor ÷ ours for rates and counts.

    1.0 is as cheap as the floor; higher is further from it (lower is better).
    None when either value is missing or not positive.
    """
    if ours is None or floor is None or ours <= 0 or floor <= 0:
        return None
    return ours / floor if row.lower_is_better else floor / ours


def _floor_text(ratio: float | None) -> str:
    if ratio is None:
        return "—"
    return f"{ratio:,.2f}x" if ratio < 10 else f"{ratio:,.0f}x"


def met(row: Row, results: dict[str, Any]) -> str:
    """Whether this project's value meets the row's target: "yes", "no" or "" (no target / no value)."""
    systems = results["systems"]
    if OURS not in systems or (row.check is None and row.min_ratio is None):
        return ""
    ours = row.value(systems[OURS])
    if ours is None:
        return "no"
    ok = row.check(ours) if row.check is not None else True
    if row.min_ratio is not None:
        ratios = [_ratio(row, ours, row.value(systems[key])) for key in CHANNELS if key in systems]
        ratios = [r for r in ratios if r is not None]
        ok = ok and bool(ratios) and min(ratios) >= row.min_ratio
    return "yes" if ok else "no"


def table(results: dict[str, Any]) -> str:
    """The Markdown table: one row per metric, one column per system.

    After this project's value: the floor's and this project's cost vs the
    floor (see :func:`floor_ratio`), when the floor ran; then each Channels
    system's value and how many times better this project is.
    """
    systems = results["systems"]
    present = [key for key in CHANNELS if key in systems]
    floor = systems.get(FLOOR)
    header = ["Workload", "Target", "This project"]
    if floor is not None:
        header += [floor["label"], "cost vs floor"]
    for key in present:
        header += [systems[key]["label"], "ratio"]
    header.append("Target met")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for row in rows(results["sizes"]):
        ours = row.value(systems[OURS]) if OURS in systems else None
        others = [key for key in (FLOOR, *present) if key in systems]
        if row.optional and ours is None and all(row.value(systems[key]) is None for key in others):
            continue
        cells = [row.label, row.target, _format(ours, row.unit) + _remark(row, systems.get(OURS))]
        if floor is not None:
            value = row.value(floor)
            cells += [_format(value, row.unit) + _remark(row, floor), _floor_text(floor_ratio(row, ours, value))]
        for key in present:
            other = row.value(systems[key])
            cells += [_format(other, row.unit) + _remark(row, systems[key]), _ratio_text(_ratio(row, ours, other))]
        cells.append(met(row, results))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def legend(results: dict[str, Any]) -> str:
    """How to read the table's ratio columns (the systems that ran decide which sentences apply)."""
    systems = results["systems"]
    parts = []
    if FLOOR in systems:
        parts.append(
            "Cost vs floor: this project's time or memory ÷ the floor's, or the floor's rate or count ÷ this "
            "project's, i.e. how many times the floor's cost this project pays: 1.00x is as cheap as the floor, "
            "lower is better (below 1.00x: better than the floor). The floor (bench/floor.py) is one asyncio "
            "process, websockets + one LISTEN: no authentication (its (e) is plain connections: connect, a first "
            "message naming a user id, an ack), no outbox, no reads; its (b), (c) are timed from the return of "
            "an autocommit `SELECT pg_notify()`."
        )
    if any(key in systems for key in CHANNELS):
        parts.append(
            "Ratio (Channels columns): how many times better this project is than that Channels setup "
            "(lower times and memory, higher rates and counts are better)."
        )
    parts.append("— means not measured or not reached (see the notes).")
    return "\n\n".join(parts)


def _remark(row: Row, system: dict[str, Any] | None) -> str:
    return row.remark(system) if row.remark is not None and system is not None else ""


def _trial_text(t: dict[str, Any]) -> str:
    pace = f"paced at {t['target_rate']:,.0f}/s" if t["target_rate"] else "as fast as possible"
    duplicates = f", {t['duplicates']:,} duplicates" if t["duplicates"] else ""
    return (
        f"{pace}: {t['publish_rate']:,.0f}/s for {t['seconds']:.0f} s, {t['lost']:,} missing{duplicates}, "
        f"last {t['drain_s']:.2f} s after the end (server {t['server_busy']:.0%}, busiest client "
        f"{t['client_busy']:.0%} of a core) {'sustained' if t['ok'] else 'NOT sustained'}"
    )


def _notes(results: dict[str, Any]) -> list[str]:
    notes = []
    for key, why in results.get("skipped", {}).items():
        notes.append(f"{key}: skipped: {why}.")
    for system in results["systems"].values():
        label = system["label"]
        for field in ("error", "extra_latency_error", "capacity_error", "capacity_skipped"):
            if system.get(field):
                notes.append(f"{label}: {field.replace('_', ' ')}: {system[field]}.")
        connect = system.get("connect")
        if connect:
            failures = ", ".join(f"{n:,} {r}" for r, n in connect["failures"].items()) or "none"
            notes.append(
                f"{label}: (e) {connect['ok']:,}/{connect['requested']:,} connections in {connect['seconds']:.1f} s; "
                f"failures: {failures}; busiest load-client process at {connect['client_busy']:.0%} of a core."
            )
        idle = system.get("idle")
        if idle:
            notes.append(
                f"{label}: (a) server RSS {idle['rss_before'] / 2**20:,.0f} → {idle['rss_after'] / 2**20:,.0f} MiB "
                f"for {idle['connections']:,} connections, which kept the server {idle['idle_cpu']:.0%} busy while "
                f"idle (keepalive pings, background work); permessage-deflate negotiated on "
                f"{idle['deflate_negotiated']:,} of them (the client offers it, as browsers do)."
            )
        for size, entry in (system.get("fanout") or {}).items():
            if not entry.get("complete"):
                notes.append(f"{label}: (b) fan-out to {int(size):,} incomplete: received {entry['received']}.")
        latency = system.get("latency")
        if latency:
            notes.append(
                f"{label}: (c) {latency['published']:,} events at {latency['rate']:,.0f}/s, "
                f"{latency['received']:,} received, {latency['lost']:,} lost, {latency['duplicates']:,} duplicates; "
                f"busiest load-client process at {latency['client_busy']:.0%}."
            )
        for key, name in (("latency_tabs", "(c')"), ("latency_solo", "(c'')")):
            entry = system.get(key)
            if not entry:
                continue
            failures = ", ".join(f"{n:,} {r}" for r, n in entry.get("connect_failures", {}).items()) or "none"
            last = _number(entry.get("p99_last_ms")) if key == "latency_tabs" else None
            until_last = f"; p99 until the user's last tab had it {last:,.2f} ms" if last else ""
            notes.append(
                f"{label}: {name} {entry['connections']:,} connection(s) of {entry['users']:,} user(s) (failures: "
                f"{failures}); {entry['published']:,} events at {entry['rate']:,.0f}/s, {entry['received']:,}/"
                f"{entry['expected']:,} receipts, {entry['lost']:,} lost, {entry['duplicates']:,} duplicates"
                f"{until_last}; busiest load-client process at {entry['client_busy']:.0%}."
            )
        for mode in ("single", "batched"):
            entry = system.get(f"rate_{mode}")
            if not entry:
                continue
            trials = "; ".join(_trial_text(t) for t in entry["trials"])
            notes.append(f"{label}: (d) {mode}, {entry['publishers']} publisher processes: {trials}.")
        for key in ("capacity", "capacity_more"):
            capacity = system.get(key)
            if not capacity:
                continue
            failures = ", ".join(f"{n:,} {r}" for r, n in capacity["failures"].items()) or "none"
            closed = ", ".join(f"{n:,} with {code}" for code, n in capacity["server_closed"].items()) or "none"
            times = ", ".join(f"{t:,.0f}" for t in capacity["fanout"]["times_ms"])
            notes.append(
                f"{label}: (f) on {capacity.get('workers', 2)} processes: "
                f"{capacity['connected']:,}/{capacity['requested']:,} connected in "
                f"{capacity['seconds']:.0f} s ({capacity['rate']:,.0f}/s; busiest load-client process at "
                f"{capacity.get('client_busy', 0):.0%} of a core), {capacity['held']:,} still open after "
                f"the fan-out; server RSS {capacity['rss'] / 2**30:,.2f} GiB, {capacity['idle_cpu']:.0%} of a core "
                f"busy while idle; failures: {failures}; "
                f"closed by the server: {closed}; fan-out times {times} ms."
            )
    return notes


METHOD = """\
How it is measured (see bench/harness.py): every server runs on this machine, on loopback, against the same
PostgreSQL (a database of its own, `realtime_bench`). One load client for all: 4+ processes of asyncio
connections written directly on `asyncio.Protocol` (a browser-like handshake with `Origin` and an offer of
permessage-deflate; our clients send the token message, Channels clients the session cookie, the floor's
clients a first message naming their user id), bound to 127.0.0.1, 127.0.0.2, ... (20,000 connections per
source address). Times are wall-clock (`time.time()`) across processes of one machine. Commit → receipt: for
this project, from the moment the publisher's COMMIT returned; for the floor, from the moment its autocommit
`SELECT pg_notify(channel, '{"u": user, "m": frame}')` returned; for Channels, from the moment `group_send()`
was called (as from `transaction.on_commit()`), so the commit itself is not counted for Channels. PostgreSQL
signals a NOTIFY at commit, before the publisher has read the answer: a floor time can be near 0, or below it
at tiny sizes (then its cost ratio is —). (c') and (c''), for this project and the floor only, each run on a
fresh server process holding only their own connections; their percentiles are over every socket's receipt.
Publish rates: this project writes every event to the outbox in a transaction (`publish()` in `atomic()`, or
`publish_many()`); Channels' publishers only call `group_send()` (no database write; "batched" = concurrent
sends); the floor has no (d) nor (f). The floor uses this project's websocket defaults (no compression, pings
every 10 s). Each server's open-files limit is raised the same way. All processes share the machine's cores:
the servers, PostgreSQL, Redis, the publishers and the load client."""


def markdown(results: dict[str, Any]) -> str:
    """results.md: the machine, the table, the method and the notes."""
    m = results["machine"]
    versions = ", ".join(f"{name} {version}" for name, version in m["versions"].items())
    load = ", ".join(f"{x:.2f}" for x in m["load_average_at_start"])
    parts = [
        "# Benchmark: this project against a floor and Django Channels",
        "",
        f"Run on {m['date']} by `make bench` in {results.get('duration_s', 0) / 60:.1f} minutes.",
        "",
        f"- Machine: {m['cores']} cores ({m['cpu'] or 'unknown CPU'}), {m['memory_bytes'] / 2**30:.1f} GiB RAM, "
        f"Linux {m['kernel']}; load average at start {load}",
        *(
            [
                f"- Open files per process: at most {m['open_files_hard_limit']:,} (RLIMIT_NOFILE hard limit, "
                "not raisable here): each server process holds fewer connections than that"
            ]
            if m.get("open_files_hard_limit")
            else []
        ),
        f"- Python {m['python']}, PostgreSQL {m['postgresql']}",
        f"- {versions}",
        "",
        table(results),
        "",
        legend(results),
        "",
        "## Method",
        "",
        METHOD,
        "",
        "## Notes",
        "",
        *[f"- {note}" for note in _notes(results)],
        "",
        "![Benchmark plot](plot.png)",
        "",
    ]
    return "\n".join(parts)


def write(results: dict[str, Any], out_dir: Path, *, plot: bool = True) -> None:
    """Write results.json, results.md and (``plot``) plot.png into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out_dir / "results.md").write_text(markdown(results))
    if plot:
        draw(results, out_dir / "plot.png")


def draw(results: dict[str, Any], path: Path) -> None:
    """Bar charts of the main rows, one panel per workload, one bar per system (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = results["systems"]
    keys = [key for key in (OURS, FLOOR, *CHANNELS) if key in systems]
    by_key = {row.key: row for row in rows(results["sizes"])}
    fanouts = [f"b{size}" for size in results["sizes"].get("fanout") or []]
    panels = [
        ("(a) memory per idle connection", ["a"], ["KiB"], "KiB (lower is better)", False),
        ("(b) fan-out, until the last client", fanouts, [k[1:] for k in fanouts], "ms (lower is better)", True),
        ("(c) commit → receipt latency", ["c50", "c99", "cmax"], ["p50", "p99", "max"], "ms (lower is better)", True),
        (
            "(c') users with several tabs",
            ["c'p50", "c'p99", "c'max"],
            ["p50", "p99", "max"],
            "ms (lower is better)",
            True,
        ),
        (
            "(c'') one connection, alone",
            ["c''p50", "c''p99", "c''max"],
            ["p50", "p99", "max"],
            "ms (lower is better)",
            True,
        ),
        ("(d) sustained publish rate", ["d1", "d2"], ["single", "batched"], "events/s (higher is better)", True),
        ("(e) new authenticated connections", ["e"], ["per second"], "connections/s (higher is better)", False),
        ("(f) two processes: held / fan-out", ["f", "f/fan-out"], ["held", "fan-out ms"], "count / ms", True),
    ]
    colors = {"ours": "#2a7ab9", "floor": "#7f7f7f", "channels-redis": "#d9534f", "channels-postgres": "#f0ad4e"}
    figure, axes = plt.subplots(2, 4, figsize=(20, 8.5))
    for axis, (title, row_keys, names, ylabel, log) in zip(axes.flat, panels, strict=True):
        width = 0.8 / max(len(keys), 1)
        for index, key in enumerate(keys):
            values = [by_key[r].value(systems[key]) if r in by_key else None for r in row_keys]
            positions = [i + (index - (len(keys) - 1) / 2) * width for i in range(len(row_keys))]
            heights = [v if v is not None else 0 for v in values]
            bars = axis.bar(positions, heights, width, label=systems[key]["label"], color=colors.get(key))
            for bar, value in zip(bars, values, strict=True):
                text = "n/a" if value is None else (f"{value:,.0f}" if value >= 100 else f"{value:.3g}")
                axis.annotate(
                    text,
                    (bar.get_x() + bar.get_width() / 2, max(bar.get_height(), 1e-9)),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    rotation=90 if len(keys) > 2 else 0,
                )
        axis.set_xticks(range(len(row_keys)), names)
        axis.set_title(title, fontsize=10)
        axis.set_ylabel(ylabel, fontsize=8)
        if log:
            axis.set_yscale("log")
        axis.margins(y=0.25)
    axes.flat[0].legend(fontsize=8)
    m = results["machine"]
    figure.suptitle(
        f"This project vs the floor and Django Channels — {m['cores']} cores, Python {m['python']}, "
        f"PostgreSQL {m['postgresql']}, {m['date']}",
        fontsize=11,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
