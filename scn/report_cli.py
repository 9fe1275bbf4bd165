"""scn-report: one table and the figures of a whole sweep.

    scn-report multirun/2026-01-01/12-00-00            # report.csv + plots in that folder
    scn-report SWEEP_DIR --run 3 --out figures/       # layers.png for job 3, outputs elsewhere

Finds every run folder below SWEEP_DIR (any depth), writes report.csv (one row per run,
values copied from each run's summary.json / metrics.csv, `pareto` marking the accuracy vs
bits/weight front) and pareto_bits.png, pareto_bytes.png, bits_over_training.png and
layers.png. Runs that crashed or are still running are listed with their status and a
warning; they never stop the report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scn import aggregate, sweep_report
from scn.errors import ScnError

PROG = "scn-report"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Aggregate a sweep of scn runs: report.csv, the Pareto front and plots.",
        epilog="Example: scn-train -m size_loss.gamma=0.001,0.01,0.1 hydra.sweep.dir=sweeps/g "
               "&& scn-report sweeps/g")
    parser.add_argument("sweep_dir", metavar="SWEEP_DIR", type=Path,
                        help="folder holding the runs (e.g. the hydra.sweep.dir of scn-train -m)")
    parser.add_argument("--run", metavar="RUN",
                        help="run shown in layers.png: its run_dir in report.csv (a Hydra job number "
                             "such as 3), or a path. Default: the most accurate Pareto run under 4 "
                             "bits/weight, else the most accurate run")
    parser.add_argument("--out", metavar="DIR", type=Path,
                        help="write report.csv and the plots here instead of SWEEP_DIR")
    return parser


def _fmt(value, spec: str) -> str:
    return "-" if value is None or value == "" else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        rows = aggregate.collect(args.sweep_dir)
        csv_path = sweep_report.write_report(args.sweep_dir, out=args.out, run=args.run, rows=rows)
    except ScnError as exc:
        print(f"\n{PROG}: error: {exc}\n", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"\n{PROG}: error: cannot write the report: {exc}\n", file=sys.stderr)
        return 1
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    status = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    print(f"{PROG}: {len(rows)} run{'s' * (len(rows) != 1)} in {args.sweep_dir} ({status}).")
    front = aggregate.pareto([r for r in rows if r["pareto"]], "bits_per_weight", "test_accuracy")
    if front:
        print("Pareto front (test accuracy vs bits per weight):")
        for r in front:
            print(f"  {r['run_dir']:>12}  {r['quant'] or '?':>13}  gamma={_fmt(r['gamma'], '.3g'):>7}  "
                  f"{_fmt(r['test_accuracy'], '6.2f')}%  {_fmt(r['bits_per_weight'], '6.3f')} bits/weight  "
                  f"{_fmt(r['file_bytes'], ',.0f')} bytes ({r['bytes_source']})")
    names = ", ".join(sweep_report.PLOT_NAMES)
    print(f"Wrote {csv_path} and {names} in {csv_path.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
