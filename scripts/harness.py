"""What every benchmark in scripts/ shares: its command line, its runs, the JSON, its figure.

    args = harness.arguments(__doc__, runs="outputs/bench/NAME")       # overrides, --runs, --out
    summaries = harness.run_methods(METHODS, ["+experiment=..."], args) # {method: summary}
    results = [harness.row(m, s) for m, s in summaries.items()]        # the common figures
    harness.write(args, __file__, "NAME", results)                     # docs/results/NAME.json
    harness.save_figure(fig, args.out / "NAME.png")

Runs go through scn-train's own code path (scn.sweep.run_overrides) and a finished run with
the same config is reused, so a killed benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from scn import io, report  # noqa: E402
from scn.sweep import run_overrides  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# What a results row copies from a run's summary.json (those the summary has).
SUMMARY_KEYS = ("test_accuracy", "bits_per_weight", "float_bits_pct", "weights_left_pct",
                "param_count", "file_bytes", "wall_time_s", "step_time_s", "images_per_s")


def arguments(doc: str, runs: str | None, argv: list[str] | None = None,
              add: Callable[[argparse.ArgumentParser], None] | None = None,
              overrides_help: str = "extra Hydra overrides for every method") -> argparse.Namespace:
    """The benchmark's command line: Hydra overrides, --runs (when it trains), --out, and what
    `add` adds; overrides and options may come in any order. `args.argv` keeps what was given."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help=overrides_help)
    if runs is not None:
        parser.add_argument("--runs", type=Path, default=ROOT / runs)
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results")
    if add is not None:
        add(parser)
    args = parser.parse_intermixed_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    return args


def run_methods(methods: dict[str, list[str]], common: list[str], args: argparse.Namespace,
                runs: Path | None = None) -> dict[str, dict]:
    """Train (or reuse) every method in `runs / method`: common, its own, then the user's overrides."""
    runs = runs or args.runs
    return {method: run_overrides([*common, *overrides, *args.overrides], runs / method)
            for method, overrides in methods.items()}


def relative(path: str | Path) -> str:
    """A run folder as the JSON records it: relative to the repository when inside it."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def row(method: str, summary: dict, keys: tuple[str, ...] = SUMMARY_KEYS, **extra) -> dict:
    """One results row: the method, the summary's figures, `extra`, and the run folder."""
    return {"method": method, **{k: summary.get(k) for k in keys}, **extra,
            "run_dir": relative(summary["run_dir"])}


def write(args: argparse.Namespace, script: str, name: str, results: list[dict], **extra) -> Path:
    """<--out>/<name>.json in the common benchmark shape, with the command (`script`: the
    benchmark's __file__, and the arguments it was given) that reproduces it; returns its path."""
    path = args.out / f"{name}.json"
    report.write_benchmark(path, relative(script), _portable(args.argv), results,
                           **extra)
    return path


def _portable(argv: list[str]) -> list[str]:
    """The arguments with the data's location as DIR: where the data lies is this machine's."""
    keys = [a.partition("=")[0] for a in argv]
    return [f"{k}=DIR" if k.lstrip("+") == "dataset.root" else a for k, a in zip(keys, argv, strict=True)]


def read_results(path: Path) -> list[dict]:
    """The records of a committed benchmark JSON (to keep those another invocation made)."""
    import json

    return json.loads(Path(path).read_text())["results"]


def bar_panels(panels, names: list[str], results: list[dict]) -> None:
    """One labelled bar chart per (axes, key, title) in `panels`: each result's `key` by name."""
    for ax, key, title in panels:
        bars = ax.bar(names, [r[key] for r in results])
        ax.bar_label(bars, fmt="%.2f")
        ax.set(title=title)
        ax.tick_params(axis="x", labelrotation=25)  # long method names would overlap
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    io.atomic_write(path, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)
