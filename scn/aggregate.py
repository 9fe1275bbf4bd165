"""Sweeps: every run below a folder in one table, the Pareto front, and the sweep's figures.

A run folder is any folder holding `summary.json`, `metrics.csv` or `.hydra/config.yaml`
(what `scn-train` and `scn.sweep.run_overrides` leave), at any depth below the sweep folder.

    rows = collect("multirun/2026-01-01/12-00-00")   # one dict per run, from its own files
    front = pareto(rows, x="bits_per_weight", y="test_accuracy")
    write_report("multirun/2026-01-01/12-00-00")       # report.csv and the four figures

Every value in a row is copied from the run's own files: summary.json for a finished run;
for a run that did not finish (summary.json missing, unreadable, or status failed/running)
the figures of its last evaluation in metrics.csv, with `status` and `note` saying so. Such a
run is never on the Pareto front and never stops the report: a warning names it.

Sizes: `file_bytes` is the size of the run's `model.scn` file when the summary records it
(`bytes_source` = "file"), else the ideal packed size, total bits / 8 (`bytes_source` = "ideal").
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

from scn import io, report  # noqa: E402
from scn.errors import ScnError  # noqa: E402
from scn.experiment import read_summary  # noqa: E402

RUN_MARKERS = ("summary.json", "metrics.csv", ".hydra/config.yaml")
REPORT_NAME = "report.csv"
PLOT_NAMES = ("pareto_bits.png", "pareto_bytes.png", "bits_over_training.png", "layers.png")
COLUMNS = ("run_dir", "status", "quant", "label", "gamma", "lr_quant", "dataset", "model", "seed",
           "test_accuracy", "bits_per_weight", "float_bits_pct", "file_bytes", "bytes_source",
           "ideal_bytes", "weights_left_pct", "channels_left_pct", "param_count", "steps",
           "wall_time_s", "pareto", "pareto_bytes", "config_hash", "note")
# Figures taken from the last metrics.csv row when a run has no final summary.
_FROM_METRICS = ("test_accuracy", "bits_per_weight", "float_bits_pct", "weights_left_pct", "param_count")

Warn = Callable[[str], None]


def _stderr_warning(message: str) -> None:
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
    except (OSError, UnicodeDecodeError, ValueError):
        return []


def _hydra_config(run_dir: Path) -> dict:
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.load(path)
        try:
            return OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # an interpolation that only resolves inside Hydra
            return OmegaConf.to_container(cfg, resolve=False)
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


def _channels_left_pct(summary: dict) -> float | None:
    left, original = summary.get("channels_left"), summary.get("channels_original")
    if not isinstance(left, dict) or not isinstance(original, dict) or not sum(original.values()):
        return None
    return 100.0 * sum(left.values()) / sum(original.values())


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
        "quant": _get(config, "quant", "kind"),
        "label": _label(summary or {}, config),
        "gamma": _get(config, "size_loss", "gamma"),
        "lr_quant": _get(config, "trainer", "lr_quant"),
        "dataset": _short_target(config, "dataset"),
        "model": _short_target(config, "model"),
        "seed": config.get("seed"),
    }
    note = ""
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
        }.get(row["status"], f"status {row['status']!r}")
        note = why + ("; figures are from its last evaluation in metrics.csv" if last
                      else "; no evaluation recorded")
        if warn is not None:
            warn(f"run {run_dir}: {note}. It is listed in the report but left out of the Pareto front.")
    row.update(pareto=False, pareto_bytes=False, config_hash=(summary or {}).get("config_hash"), note=note)
    return {k: row.get(k) for k in COLUMNS}


def collect(sweep_dir: str | Path, warn: Warn | None = _stderr_warning) -> list[dict]:
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


def _number(value) -> float | None:
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
              if (xv := _number(r.get(x))) is not None and (yv := _number(r.get(y))) is not None]
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
                if r.get("status") == "finished" and _number(r.get("test_accuracy")) is not None]
    small = [r for r in finished
             if r.get("pareto") and (_number(r.get("bits_per_weight")) or math.inf) < max_bits]
    pool = small or finished
    if not pool:
        return None
    return max(pool, key=lambda r: (r["test_accuracy"], -(_number(r.get("bits_per_weight")) or math.inf)))


# ---------------------------------------------------------------------------------------- plots


def _series_name(row: dict) -> str:
    quant, label = row.get("quant") or "unknown scheme", row.get("label")
    return f"{quant} / {label}" if label and label != quant else quant


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    io.atomic_write(path, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)


def _empty_plot(path: Path, title: str, message: str) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, transform=ax.transAxes)
    ax.set(title=title, xticks=[], yticks=[])
    _save(fig, path)


def _fmt_gamma(g) -> str:
    return "?" if _number(g) is None else f"{float(g):.3g}"


def plot_pareto(rows: list[dict], x: str, path: str | Path, log_x: bool = False) -> None:
    """Accuracy against `x` for every finished run, one series per scheme, the front as steps."""
    path = Path(path)
    done = [r for r in rows if r.get("status") == "finished"
            and _number(r.get(x)) is not None and _number(r.get("test_accuracy")) is not None]
    if x == "file_bytes":
        sources = {r.get("bytes_source") for r in done}
        if sources == {"file"}:
            xlabel = "model.scn file size (bytes, log scale)"
        elif sources == {"ideal"}:
            xlabel = "ideal model size: total bits / 8 (bytes, log scale; no model.scn sizes recorded)"
        else:
            xlabel = "model size (bytes, log scale): model.scn size where recorded, else bits / 8"
        what = "model size"
    else:
        xlabel, what = "bits per weight (mean over all stored weights)", "bits per weight"
    title = f"Test accuracy vs {what}"
    if not done:
        _empty_plot(path, title,
                    "No finished runs yet: nothing to plot.\nSee report.csv for each run's status.")
        return
    fig, ax = plt.subplots(figsize=(9, 6))
    markers = "osD^v<>phX*"
    for i, name in enumerate(sorted({_series_name(r) for r in done})):
        pts = [r for r in done if _series_name(r) == name]
        ax.scatter([r[x] for r in pts], [r["test_accuracy"] for r in pts], marker=markers[i % len(markers)],
                   s=45, alpha=0.8, label=f"{name} ({len(pts)} run{'s' * (len(pts) != 1)})", zorder=3)
    front = pareto(done, x, "test_accuracy")
    if front:
        fx, fy = [r[x] for r in front], [r["test_accuracy"] for r in front]
        ax.step(fx, fy, where="post", color="black", lw=1.2, zorder=2,
                label="Pareto front (best accuracy at each size)")
        ax.scatter(fx, fy, s=140, facecolors="none", edgecolors="black", zorder=4)
        labels: dict[tuple, list[str]] = {}  # equal points share one label
        for r in front:
            gammas = labels.setdefault((r[x], r["test_accuracy"]), [])
            if _fmt_gamma(r.get("gamma")) not in gammas:
                gammas.append(_fmt_gamma(r.get("gamma")))
        for (px, py), gammas in labels.items():
            ax.annotate("γ=" + ", ".join(gammas), (px, py), textcoords="offset points",
                        xytext=(6, -12), fontsize=8)
    if log_x:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(EngFormatter(unit="B"))
        ax.xaxis.set_minor_formatter(EngFormatter(unit="B"))
        ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set(xlabel=xlabel, ylabel="test accuracy (%)",
           title=f"{title} ({len(done)} finished run{'s' * (len(done) != 1)}; up and left is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small", loc="lower right")
    _save(fig, path)


def _varying(rows: list[dict], keys=("quant", "label", "gamma", "lr_quant", "seed", "dataset")) -> list[str]:
    return [k for k in keys if len({str(r.get(k)) for r in rows}) > 1]


def plot_bits_over_training(rows: list[dict], sweep_dir: str | Path, path: str | Path) -> None:
    """Bits per weight against training step, one line per run, coloured by gamma (metrics.csv)."""
    path, sweep_dir = Path(path), Path(sweep_dir)
    curves = [(r, hist) for r in rows if (hist := read_metrics(sweep_dir / r["run_dir"]))
              and any(_number(h.get("bits_per_weight")) is not None for h in hist)]
    learned = [(r, h) for r, h in curves if r.get("quant") not in ("none", "fixed")]
    curves = learned or curves  # float and fixed-bit runs are flat lines: shown only when alone
    title = "Bits per weight over training"
    if not curves:
        _empty_plot(path, title, "No run has an evaluation in metrics.csv yet.")
        return
    curves.sort(key=lambda c: (_number(c[0].get("gamma")) or 0.0, c[0]["run_dir"]))
    gammas = [g for r, _ in curves if (g := _number(r.get("gamma"))) and g > 0]
    norm = None
    if gammas and min(gammas) < max(gammas):
        norm = matplotlib.colors.LogNorm(min(gammas), max(gammas))
    cmap = plt.get_cmap("viridis")
    vary = _varying([r for r, _ in curves]) or ["gamma"]
    fig, ax = plt.subplots(figsize=(9, 6))
    for r, hist in curves:
        g = _number(r.get("gamma"))
        color = cmap(norm(g)) if norm and g and g > 0 else None
        parts = [f"γ={_fmt_gamma(r.get(k))}" if k == "gamma" else f"{k}={r.get(k)}" for k in vary]
        if r.get("status") != "finished":
            parts.append(f"[{r.get('status')}]")
        ax.plot([h.get("step") for h in hist], [h.get("bits_per_weight") for h in hist], marker="o", ms=3,
                color=color, ls="-" if r.get("status") == "finished" else "--", label=", ".join(parts))
    if len(curves) <= 12:
        ax.legend(fontsize="small", title="run")
    elif norm is not None:
        fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax,
                     label="size-loss weight gamma (log scale)")
    ax.set(xlabel="training step", ylabel="bits per weight (mean over all stored weights)",
           title=f"{title}: {len(curves)} run{'s' * (len(curves) != 1)}, colour = gamma "
                 "(dashed: did not finish)")
    ax.grid(alpha=0.3)
    _save(fig, path)


def layer_bits(run_dir: str | Path) -> dict[str, float] | None:
    """Mean stored bit depth of each layer's output channels (32 for float layers), from the
    run's model.safetensors; None when there is none or it cannot be loaded."""
    path = Path(run_dir) / "model.safetensors"
    if not path.is_file():
        return None
    try:
        from scn.checkpoint import load_checkpoint
        from scn.quant import sc_layers

        model, _ = load_checkpoint(path)
        return {name: float(layer.int_bits().float().mean()) for name, layer in sc_layers(model)}
    except Exception:  # a broken or foreign checkpoint: fall back to channels only
        return None


def _channels(run_dir: Path) -> tuple[dict[str, float], dict[str, float] | None]:
    """(channels left, channels original or None) per layer, from summary.json or metrics.csv."""
    summary = read_summary(run_dir)
    if isinstance(summary, dict) and isinstance(summary.get("channels_left"), dict):
        return summary["channels_left"], summary.get("channels_original")
    last = (read_metrics(run_dir) or [{}])[-1]
    return {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("channels/")}, None


def plot_layers(run: dict, sweep_dir: str | Path, path: str | Path, rows: list[dict] | None = None,
                warn: Warn | None = None) -> None:
    """Per layer for one run: mean bits and the fraction of channels left; with several finished
    runs, also a heatmap of channels left per layer across the sweep."""
    path, sweep_dir = Path(path), Path(sweep_dir)
    run_dir = sweep_dir / run["run_dir"]
    bits = layer_bits(run_dir)
    left, original = _channels(run_dir)
    if bits is None and warn is not None:
        warn(f"run {run_dir}: model.safetensors is missing or cannot be loaded; layers.png shows "
             "channels only.")
    others = [r for r in rows or [] if r.get("status") == "finished"]
    heat = len(others) >= 2
    fig, axes = plt.subplots(1, 3 if heat else 2, figsize=(16 if heat else 11, 5),
                             gridspec_kw={"width_ratios": [1, 1, 1.3] if heat else [1, 1]})
    layers = list(bits or left)
    a = axes[0]
    if bits:
        bars = a.bar(range(len(bits)), list(bits.values()), color="tab:blue")
        a.bar_label(bars, fmt="%.2f", fontsize=8)
        a.set_xticks(range(len(bits)), list(bits), rotation=45, ha="right")
        a.set(ylabel="mean bits per output channel (float layer = 32)")
    else:
        a.text(0.5, 0.5, "model.safetensors missing or unreadable:\nmean bits per layer unavailable",
               ha="center", va="center", transform=a.transAxes)
        a.set(xticks=[], yticks=[])
    a.set(xlabel="layer", title="Mean stored bit depth per layer")
    a = axes[1]
    if left:
        names = [n for n in layers if n in left] or list(left)
        if original:
            frac = [left[n] / original[n] if original.get(n) else float("nan") for n in names]
            bars = a.bar(range(len(names)), frac, color="tab:green")
            a.bar_label(bars, [f"{int(left[n])}/{int(original[n])}" if n in original else "?"
                               for n in names], fontsize=8)
            a.set(ylim=(0, 1.1), ylabel="channels left (fraction of original)")
        else:
            a.bar(range(len(names)), [left[n] for n in names], color="tab:green")
            a.set(ylabel="output channels left (original count unknown)")
        a.set_xticks(range(len(names)), names, rotation=45, ha="right")
    else:
        a.text(0.5, 0.5, "no channel counts recorded", ha="center", va="center", transform=a.transAxes)
    a.set(xlabel="layer", title="Output channels left per layer")
    if heat:
        _channel_heatmap(axes[2], fig, others, sweep_dir, run)
    acc, bpw = _number(run.get("test_accuracy")), _number(run.get("bits_per_weight"))
    figures = ("no final figures" if acc is None or bpw is None
               else f"{acc:.2f}% test accuracy at {bpw:.3f} bits/weight")
    fig.suptitle(f"Run {run['run_dir']} ({run.get('quant')}, γ={_fmt_gamma(run.get('gamma'))}, "
                 f"status {run.get('status')}): {figures}")
    _save(fig, path)


def _channel_heatmap(ax, fig, rows: list[dict], sweep_dir: Path, chosen: dict) -> None:
    rows = sorted(rows, key=lambda r: (_number(r.get("bits_per_weight")) or 0.0, r["run_dir"]))
    table = [_channels(sweep_dir / r["run_dir"]) for r in rows]
    layers: list[str] = []
    for left, _ in table:
        layers += [k for k in left if k not in layers]
    grid = [[(left[n] / orig[n]) if orig and orig.get(n) and n in left else float("nan") for n in layers]
            for left, orig in table]
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, label="channels left (fraction of original)")
    ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right")
    names = [("▶ " if r is chosen else "") + f"{r['run_dir']}  γ={_fmt_gamma(r.get('gamma'))}  "
             f"{_number(r.get('bits_per_weight')) or float('nan'):.2f} b/w" for r in rows]
    ax.set_yticks(range(len(rows)), names, fontsize=max(4.0, min(8.0, 240 / len(rows))))
    ax.set(xlabel="layer", title="Channels left, every finished run (sorted by bits/weight)")


# ----------------------------------------------------------------------------------- the report


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


def write_report(sweep_dir: str | Path, out: str | Path | None = None, run: str | Path | None = None,
                 warn: Warn | None = _stderr_warning, rows: list[dict] | None = None) -> Path:
    """Write report.csv and the sweep's figures into `out` (default: `sweep_dir`); returns the
    path of report.csv. `run` picks the run layers.png shows (default: see `choose_run`)."""
    sweep_dir = Path(sweep_dir)
    out = Path(out) if out is not None else sweep_dir
    rows = collect(sweep_dir, warn) if rows is None else rows
    chosen = find_run(rows, sweep_dir, run) if run is not None else choose_run(rows)
    csv_path = out / REPORT_NAME
    report.write_csv(csv_path, csv_rows(rows))
    plot_pareto(rows, "bits_per_weight", out / "pareto_bits.png")
    plot_pareto(rows, "file_bytes", out / "pareto_bytes.png", log_x=True)
    plot_bits_over_training(rows, sweep_dir, out / "bits_over_training.png")
    if chosen is not None:  # (a run outside sweep_dir has an absolute run_dir: the join keeps it)
        plot_layers(chosen, sweep_dir, out / "layers.png", rows, warn)
    else:
        _empty_plot(out / "layers.png", "Per-layer bits and channels",
                    "No finished run to show. Pick one with --run RUN.")
        if warn is not None:
            warn("no finished run: layers.png is empty (pick a run with --run).")
    return csv_path
