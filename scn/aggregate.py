"""Sweeps as a table: every run below a folder in one row, and the Pareto front.

A run folder is any folder holding `summary.json`, `metrics.csv` or `.hydra/config.yaml`
(what `scn-train` and `scn.sweep.run_overrides` leave), at any depth below the sweep folder.

    rows = collect("multirun/2026-01-01/12-00-00")   # one dict per run, from its own files
    front = pareto(rows, x="bits_per_weight", y="test_accuracy")

Every value in a row is copied from the run's own files: summary.json for a finished run;
for a run that did not finish (summary.json missing, unreadable, or status failed/running)
the figures of its last evaluation in metrics.csv, with `status` and `note` saying so. Such a
run is never on the Pareto front and never stops the report: a warning names it.

Sizes: `file_bytes` is the size of the run's `model.scn` file when the summary records it
(`bytes_source` = "file"), else the ideal packed size, total bits / 8 (`bytes_source` = "ideal").
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from scn import report
from scn.errors import ScnError
from scn.experiment import read_summary
from scn.methods import kind_of_target

RUN_MARKERS = ("summary.json", "metrics.csv", ".hydra/config.yaml")
COLUMNS = ("run_dir", "status", "quant", "label", "gamma", "lr_quant", "dataset", "model", "seed",
           "test_accuracy", "bits_per_weight", "float_bits_pct", "file_bytes", "bytes_source",
           "ideal_bytes", "weights_left_pct", "channels_left_pct", "param_count", "steps",
           "wall_time_s", "pareto", "pareto_bytes", "config_hash", "note")
# Figures taken from the last metrics.csv row when a run has no final summary.
_FROM_METRICS = ("test_accuracy", "bits_per_weight", "float_bits_pct", "weights_left_pct", "param_count")

Warn = Callable[[str], None]


def warn_stderr(message: str) -> None:
    print(f"scn-report: warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------- finding runs


def _natural_key(path: Path) -> tuple:
    """Sort 2 before 10: Hydra numbers its jobs 0, 1, ..., 10, 11."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.parts)


def is_run_dir(path: Path) -> bool:
    return any((path / marker).is_file() for marker in RUN_MARKERS)


def find_runs(sweep_dir: str | Path) -> list[Path]:
    """Every run folder at or below `sweep_dir`, in natural order (hidden folders not searched)."""
    root = Path(sweep_dir)
    found = [root] if is_run_dir(root) else []
    found += [p for p in root.rglob("*")
              if p.is_dir() and not any(part.startswith(".") for part in p.relative_to(root).parts)
              and is_run_dir(p)]
    return sorted(found, key=lambda p: _natural_key(p.relative_to(root)))


# ------------------------------------------------------------------------------ one row per run


def size_bytes(summary: dict) -> tuple[float | None, str]:
    """(bytes, source): the model.scn file size when recorded, else the ideal size (bits / 8)."""
    if summary.get("file_bytes") is not None:
        return summary["file_bytes"], "file"
    if summary.get("ideal_bytes") is not None:
        return summary["ideal_bytes"], "ideal"
    return None, ""


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of a run's metrics.csv ([] when it is missing or unreadable)."""
    path = Path(run_dir) / "metrics.csv"
    try:
        return report.read_csv(path) if path.is_file() else []
    except (OSError, UnicodeDecodeError, ValueError, csv.Error):  # csv.Error: a field over 128 KiB
        return []


def _hydra_config(run_dir: Path) -> dict:
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    try:
        # Data, not a config to run: interpolations stay as written, no resolver runs (an
        # ${oc.env:...} in a stranger's run folder must not copy environment variables out).
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:
        return {}


def _get(config: dict, *keys):
    for key in keys:
        if not isinstance(config, dict):
            return None
        config = config.get(key)
    return config


def _short_target(config: dict, group: str) -> str | None:
    node = config.get(group)
    if not isinstance(node, dict):
        return None
    return node.get("name") or str(node.get("_target_", "")).rsplit(".", 1)[-1] or None


def _label(summary: dict, config: dict) -> str | None:
    for source in (summary, config):
        for key in ("method", "label"):
            if isinstance(source.get(key), str):
                return source[key]
    return None


def channel_counts(summary: dict, key: str) -> dict[str, float] | None:
    """A summary's channels per layer (`channels_left` or `channels_original`), or None when
    it has none or any count is not a number."""
    counts = summary.get(key)
    if not isinstance(counts, dict) or not all(_is_number(v) for v in counts.values()):
        return None
    return counts


def _channels_left_pct(summary: dict) -> float | None:
    left, original = channel_counts(summary, "channels_left"), channel_counts(summary, "channels_original")
    if left is None or original is None or not sum(original.values()):
        return None
    return 100.0 * sum(left.values()) / sum(original.values())


def _not_numbers(summary: dict) -> list[str]:
    """The figures of a finished summary that are not (finite) numbers."""
    bad = [k for k in ("test_accuracy", "bits_per_weight") if not _is_number(summary.get(k))]
    return bad + [k for k in ("channels_left", "channels_original")
                  if k in summary and channel_counts(summary, k) is None]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def run_row(run_dir: str | Path, sweep_dir: str | Path | None = None, warn: Warn | None = None) -> dict:
    """One run as a flat row (see the module docstring); `warn` hears about unfinished runs."""
    run_dir = Path(run_dir)
    rel = run_dir.relative_to(sweep_dir).as_posix() if sweep_dir is not None else str(run_dir)
    has_summary = (run_dir / "summary.json").is_file()
    summary = read_summary(run_dir) if has_summary else None
    summary = summary if isinstance(summary, dict) else None
    config = (summary or {}).get("config")
    config = config if isinstance(config, dict) else _hydra_config(run_dir)
    row = {
        "run_dir": rel or ".",
        "status": (summary or {}).get("status") or ("unreadable" if has_summary else "missing"),
        "quant": _get(config, "quant", "kind") or kind_of_target(_get(config, "quant", "_target_")),
        "label": _label(summary or {}, config),
        "gamma": _get(config, "size_loss", "gamma"),
        "lr_quant": _get(config, "trainer", "lr_quant"),
        "dataset": _short_target(config, "dataset"),
        "model": _short_target(config, "model"),
        "seed": config.get("seed"),
    }
    note = ""
    if row["status"] == "finished" and _not_numbers(summary):
        row["status"] = "broken"
    if row["status"] == "finished":
        file_bytes, source = size_bytes(summary)
        row.update({k: summary.get(k) for k in ("test_accuracy", "bits_per_weight", "float_bits_pct")})
        row.update(file_bytes=file_bytes, bytes_source=source, ideal_bytes=summary.get("ideal_bytes"),
                   weights_left_pct=summary.get("weights_left_pct"),
                   channels_left_pct=_channels_left_pct(summary),
                   param_count=summary.get("param_count"), steps=summary.get("steps"),
                   wall_time_s=summary.get("wall_time_s"), diffq_true_bytes=summary.get("diffq_true_bytes"))
    else:
        last = (read_metrics(run_dir) or [{}])[-1]
        row.update({k: last.get(k) for k in _FROM_METRICS})
        row.update(file_bytes=None, bytes_source="", ideal_bytes=None, channels_left_pct=None,
                   steps=last.get("step"), wall_time_s=(summary or {}).get("wall_time_s"))
        why = {
            "missing": "no summary.json (the run crashed before writing it, or never started)",
            "unreadable": "summary.json is unreadable (truncated or not JSON)",
            "running": "status 'running': still training, or killed before it finished",
            "paused": (f"status 'paused' at step {(summary or {}).get('step')} (trainer.pause_after_"
                       "steps): the same command with resume=true goes on"),
            "failed": f"status 'failed': {(summary or {}).get('error', 'no error recorded')}",
            "broken": (f"summary.json says finished but its {', '.join(_not_numbers(summary or {}))} "
                       "is not a number (an edited or damaged file)"),
        }.get(row["status"], f"status {row['status']!r}")
        note = why + ("; figures are from its last evaluation in metrics.csv" if last
                      else "; no evaluation recorded")
        if warn is not None:
            warn(f"run {run_dir}: {note}. It is listed in the report but left out of the Pareto front.")
    row.update(pareto=False, pareto_bytes=False, config_hash=(summary or {}).get("config_hash"), note=note)
    return {k: row.get(k) for k in COLUMNS}


def collect(sweep_dir: str | Path, warn: Warn | None = warn_stderr) -> list[dict]:
    """One row per run folder below `sweep_dir` (keys: COLUMNS; `run_dir` relative to it).

    `pareto` marks the runs on the accuracy / bits-per-weight front, `pareto_bytes` those on
    the accuracy / file-bytes front (finished runs only). Raises ScnError when `sweep_dir`
    is missing or holds no run.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ScnError(f"{sweep_dir} is not a folder. Give the sweep folder scn-train -m wrote "
                       "(hydra.sweep.dir, by default multirun/DATE/TIME).")
    runs = find_runs(sweep_dir)
    if not runs:
        raise ScnError(f"{sweep_dir} holds no runs: no folder at or below it has summary.json, "
                       "metrics.csv or .hydra/config.yaml. Give the folder a sweep wrote "
                       "(scn-train -m ... hydra.sweep.dir=DIR), or wait until its first run starts.")
    rows = [run_row(run, sweep_dir, warn) for run in runs]
    mark_pareto(rows)
    return rows


# ---------------------------------------------------------------------------------- Pareto front


def number(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def pareto(rows: Iterable[dict], x: str, y: str) -> list[dict]:
    """The rows no other row beats: smaller or equal `x` AND larger or equal `y`, one strictly.

    `x` is minimised (size), `y` maximised (accuracy). Rows lacking either value are ignored;
    equal points are all kept. Returns the front's rows sorted by `x` (then by `y`).
    """
    points = [(xv, yv, r) for r in rows
              if (xv := number(r.get(x))) is not None and (yv := number(r.get(y))) is not None]
    front = [(xv, yv, r) for xv, yv, r in points
             if not any(ox <= xv and oy >= yv and (ox < xv or oy > yv) for ox, oy, _ in points)]
    return [r for _, _, r in sorted(front, key=lambda p: (p[0], p[1]))]


def mark_pareto(rows: list[dict]) -> None:
    """Set `pareto` / `pareto_bytes` on finished rows (accuracy vs bits/weight, vs file bytes)."""
    finished = [r for r in rows if r.get("status") == "finished"]
    for column, x in (("pareto", "bits_per_weight"), ("pareto_bytes", "file_bytes")):
        on_front = {id(r) for r in pareto(finished, x, "test_accuracy")}
        for r in rows:
            r[column] = id(r) in on_front


def choose_run(rows: list[dict], max_bits: float = 4.0) -> dict | None:
    """The run to show layer by layer: the most accurate Pareto run under `max_bits` bits/weight,
    else the most accurate finished run (fewest bits breaks ties); None if none finished."""
    finished = [r for r in rows
                if r.get("status") == "finished" and number(r.get("test_accuracy")) is not None]
    small = [r for r in finished
             if r.get("pareto") and (number(r.get("bits_per_weight")) or math.inf) < max_bits]
    pool = small or finished
    if not pool:
        return None
    return max(pool, key=lambda r: (r["test_accuracy"], -(number(r.get("bits_per_weight")) or math.inf)))


# ------------------------------------------------------------------------------------ rows out


def csv_rows(rows: list[dict]) -> list[dict]:
    """Rows as written to report.csv: booleans as true/false, missing values empty."""
    return [{k: ("true" if v else "false") if isinstance(v, bool) else ("" if v is None else v)
             for k, v in r.items()} for r in rows]


def find_run(rows: list[dict], sweep_dir: str | Path, run: str | Path) -> dict:
    """The row of `run`: its run_dir as in report.csv, a path, or a Hydra job number."""
    sweep_dir = Path(sweep_dir).resolve()
    wanted = Path(run)
    for candidate in (sweep_dir / wanted, wanted):
        if candidate.is_dir():
            target = candidate.resolve()
            for r in rows:
                if (sweep_dir / r["run_dir"]).resolve() == target:
                    return r
            if is_run_dir(target):  # a run folder outside the sweep folder
                return run_row(target, None)
    known = ", ".join(r["run_dir"] for r in rows[:10]) + (", ..." if len(rows) > 10 else "")
    raise ScnError(f"--run {run}: no such run folder in {sweep_dir}. Its runs are: {known}.")
