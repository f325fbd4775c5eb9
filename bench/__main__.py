"""``python -m bench``: run the benchmark (``make bench``); ``--help`` for options."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from bench.harness import FULL, RESULTS_DIR, SMOKE, SYSTEMS, run, scaled

WORKLOADS = ("a-f", "g")


def main(argv: list[str] | None = None) -> int:
    """Parse options, run the benchmark, print the table; return an exit status."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, from {', '.join(SYSTEMS)}")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where to write results.md, plot.png")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds), for checking the harness")
    parser.add_argument("--quick", action="store_true", help="about a tenth of the full sizes")
    parser.add_argument("--no-plot", action="store_true", help="do not draw plot.png (no matplotlib needed)")
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help="comma-separated: a-f (the systems side by side), g (1 to 16 workers, one PostgreSQL; this project)",
    )
    args = parser.parse_args(argv)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if set(workloads) - set(WORKLOADS):
        parser.error(f"unknown workloads: {', '.join(sorted(set(workloads) - set(WORKLOADS)))}; choose from a-f, g")
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown systems: {', '.join(unknown)}")
    sizes = SMOKE if args.smoke else FULL
    if args.quick:
        sizes = scaled(
            FULL,
            idle=500,
            fanout=(500, 1_000),
            fanout_repeats=3,
            latency_users=200,
            latency_rate=200.0,
            latency_seconds=3.0,
            rate_seconds=5.0,
            probe_seconds=2.0,
            capacity=1_000,
            capacity_budget=30.0,
            users=500,
        )
    status = 0
    try:
        if "a-f" in workloads:
            run(sizes, systems, args.out, plot=not args.no_plot)
        if "g" in workloads:
            status = scaling(args.out, smoke=args.smoke, quick=args.quick, plot=not args.no_plot)
    except KeyboardInterrupt:
        print("\ninterrupted: every process the benchmark started was stopped", file=sys.stderr)
        return 130
    return status


def scaling(out: Path, *, smoke: bool, quick: bool, plot: bool) -> int:
    """Run workload (g) in a process of its own (its Django uses a PostgreSQL of its own); return its status."""
    command = [sys.executable, "-m", "bench.scaling", "--out", str(out)]
    command += ["--smoke"] if smoke else []
    command += ["--quick"] if quick else []
    command += [] if plot else ["--no-plot"]
    return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
