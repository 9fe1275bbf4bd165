"""A sweep's report: report.csv and the figures of every run below a folder.

    write_report("multirun/2026-01-01/12-00-00")   # report.csv and the four figures

The rows come from scn.aggregate (each value copied from the run's own files); this module
draws them: accuracy against bits/weight and against file bytes with the Pareto front, bits
over training per gamma, and bits and channels per layer of one run.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

from scn import aggregate, io, report  # noqa: E402
from scn.aggregate import Warn, number, read_metrics  # noqa: E402
from scn.experiment import read_summary  # noqa: E402

REPORT_NAME = "report.csv"
PLOT_NAMES = ("pareto_bits.png", "pareto_bytes.png", "bits_over_training.png", "layers.png")


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
    return "?" if number(g) is None else f"{float(g):.3g}"


def plot_pareto(rows: list[dict], x: str, path: str | Path, log_x: bool = False) -> None:
    """Accuracy against `x` for every finished run, one series per scheme, the front as steps."""
    path = Path(path)
    done = [r for r in rows if r.get("status") == "finished"
            and number(r.get(x)) is not None and number(r.get("test_accuracy")) is not None]
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
    front = aggregate.pareto(done, x, "test_accuracy")
    if front:
        fx, fy = [r[x] for r in front], [r["test_accuracy"] for r in front]
        ax.step(fx, fy, where="post", color="black", lw=1.2, zorder=2,
                label="Pareto front (best accuracy at each size)")
        ax.scatter(fx, fy, s=140, facecolors="none", edgecolors="black", zorder=4)
        labels: dict[tuple, list[str]] = {}  # equal points share one label
        for r in front:
            # a caller's own name for the point (a benchmark's knob), else the sweep's gamma
            text = r.get("point_label") or "γ=" + _fmt_gamma(r.get("gamma"))
            texts = labels.setdefault((r[x], r["test_accuracy"]), [])
            if text not in texts:
                texts.append(text)
        for (px, py), texts in labels.items():
            ax.annotate(", ".join(texts), (px, py), textcoords="offset points",
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
              and any(number(h.get("bits_per_weight")) is not None for h in hist)]
    learned = [(r, h) for r, h in curves if r.get("quant") not in ("none", "fixed")]
    curves = learned or curves  # float and fixed-bit runs are flat lines: shown only when alone
    title = "Bits per weight over training"
    if not curves:
        _empty_plot(path, title, "No run has an evaluation in metrics.csv yet.")
        return
    curves.sort(key=lambda c: (number(c[0].get("gamma")) or 0.0, c[0]["run_dir"]))
    gammas = [g for r, _ in curves if (g := number(r.get("gamma"))) and g > 0]
    norm = None
    if gammas and min(gammas) < max(gammas):
        norm = matplotlib.colors.LogNorm(min(gammas), max(gammas))
    cmap = plt.get_cmap("viridis")
    vary = _varying([r for r, _ in curves]) or ["gamma"]
    fig, ax = plt.subplots(figsize=(9, 6))
    for r, hist in curves:
        g = number(r.get("gamma"))
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
    left = aggregate.channel_counts(summary, "channels_left") if isinstance(summary, dict) else None
    if left is not None:
        return left, aggregate.channel_counts(summary, "channels_original")
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
    acc, bpw = number(run.get("test_accuracy")), number(run.get("bits_per_weight"))
    figures = ("no final figures" if acc is None or bpw is None
               else f"{acc:.2f}% test accuracy at {bpw:.3f} bits/weight")
    fig.suptitle(f"Run {run['run_dir']} ({run.get('quant')}, γ={_fmt_gamma(run.get('gamma'))}, "
                 f"status {run.get('status')}): {figures}")
    _save(fig, path)


def _channel_heatmap(ax, fig, rows: list[dict], sweep_dir: Path, chosen: dict) -> None:
    rows = sorted(rows, key=lambda r: (number(r.get("bits_per_weight")) or 0.0, r["run_dir"]))
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
             f"{number(r.get('bits_per_weight')) or float('nan'):.2f} b/w" for r in rows]
    ax.set_yticks(range(len(rows)), names, fontsize=max(4.0, min(8.0, 240 / len(rows))))
    ax.set(xlabel="layer", title="Channels left, every finished run (sorted by bits/weight)")


def write_report(sweep_dir: str | Path, out: str | Path | None = None, run: str | Path | None = None,
                 warn: aggregate.Warn | None = aggregate.warn_stderr, rows: list[dict] | None = None) -> Path:
    """Write report.csv and the sweep's figures into `out` (default: `sweep_dir`); returns the
    path of report.csv. `run` picks the run layers.png shows (default: see `choose_run`)."""
    sweep_dir = Path(sweep_dir)
    out = Path(out) if out is not None else sweep_dir
    rows = aggregate.collect(sweep_dir, warn) if rows is None else rows
    chosen = aggregate.find_run(rows, sweep_dir, run) if run is not None else aggregate.choose_run(rows)
    csv_path = out / REPORT_NAME
    report.write_csv(csv_path, aggregate.csv_rows(rows))
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
