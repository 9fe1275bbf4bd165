"""Regenerate the paper's figure types from configs.

  fig_accuracy_vs_size   accuracy against size (bits/weight and file bytes): self-compression
                         against float and fixed-bit QAT (and DiffQ when its runs exist)
  fig_bits_per_layer     mean stored bit depth per layer of a self-compressed network
  fig_channels_per_layer output channels remaining per layer
  fig_bits_over_training bits per weight over training, one line per gamma

CPU-reduced by default: Fashion-MNIST (the runs of bench_pareto.py, reused when finished) and
the CPU CIFAR-10 config (float and self-compression, reused from bench_cifar10.py). `--full`
selects the GPU CIFAR-10 config instead. Missing runs are trained first (resumable).
Writes PNGs and their CSV data under docs/results/figures/.

    python scripts/paper_figures.py --cifar-root DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

import bench_cifar10
import bench_pareto
import harness
import matplotlib.pyplot as plt
from harness import ROOT

from scn import aggregate, checkpoint, report, sweep_report
from scn.quant import sc_layers
from scn.sweep import run_overrides

FMNIST_POINTS = {  # run name -> overrides; names shared with bench_pareto.py
    "none": ["quant=none"],
    **{f"fixed{b}": ["quant=fixed", f"quant.init_bits={b}"] for b in (8, 4, 3, 2)},
    **{name: overrides for name, method, _, overrides in bench_pareto.points()
       if method == "diffq" and name in bench_pareto.DIFFQ_LOW_BITS},
    **{f"gamma_sweep/gamma_{g}": ["quant=self_compress", f"size_loss.gamma={g}"]
       for g in (0.02, 0.05, 0.1, 0.2, 0.4)},
    "removal_recipe": bench_pareto.REMOVAL_RECIPE,
}
CIFAR_POINTS = {"none": [*bench_cifar10.PLAIN, "quant=none"], "self_compress": bench_cifar10.PLAIN,
                "self_compress_removal": [*bench_cifar10.PLAIN, *bench_cifar10.REMOVAL]}


def run_all(runs: Path, experiment: str, points: dict[str, list[str]], extra: list[str]) -> list[dict]:
    for name, overrides in points.items():
        run_overrides([f"+experiment={experiment}", *overrides, *extra], runs / name)
    rows = [r for r in aggregate.collect(runs) if r["run_dir"] in points]
    for r in rows:
        r["run_path"] = runs / r["run_dir"]
        if "removal" in r["run_dir"]:  # the channel-removal recipe: a series of its own
            r["label"] = "channel removal"
    aggregate.mark_pareto(rows)
    return rows


def layer_table(run_dir: Path) -> list[dict]:
    """Per layer of a finished run's model: mean stored bits, channels left and original."""
    model, header = checkpoint.load_checkpoint(run_dir / "model.safetensors")
    original = header["reference"]["out_channels"]
    rows = []
    for name, layer in sc_layers(model):
        bits = layer.int_bits().float()
        rows.append({"layer": name, "mean_bits": float(bits.mean()) if layer.quantized else 32.0,
                     "channels_left": int(layer.live_out().sum()),
                     "channels_original": original.get(name, layer.weight.shape[0])})
    return rows


def fig_layers(tables: dict[str, list[dict]], key: str, ylabel: str, title: str, path: Path) -> None:
    fig, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 4.2), squeeze=False)
    for ax, (name, rows) in zip(axes[0], tables.items(), strict=True):
        xs = range(len(rows))
        if key == "channels":
            ax.bar(xs, [r["channels_original"] for r in rows], color="lightgray", label="original")
            ax.bar(xs, [r["channels_left"] for r in rows], label="left")
            ax.legend()
        else:
            ax.bar(xs, [r["mean_bits"] for r in rows])
        ax.set_xticks(list(xs), [r["layer"] for r in rows], rotation=45, ha="right", fontsize=8)
        ax.set(title=name, xlabel="layer", ylabel=ylabel)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    harness.save_figure(fig, path)


def fig_bits_over_training(rows: list[dict], path: Path) -> list[dict]:
    data = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in sorted((r for r in rows if r["quant"] == "self_compress"), key=lambda r: r["gamma"]):
        metrics = aggregate.read_metrics(r["run_path"])
        recipe = " channel removal" if r.get("label") == "channel removal" else ""
        ax.plot([m["step"] for m in metrics], [m["bits_per_weight"] for m in metrics], "o-",
                label=f"γ={r['gamma']:g}{recipe} ({r['test_accuracy']:.2f}%)")
        data += [{"gamma": r["gamma"], "recipe": recipe.strip() or "default", "step": m["step"],
                  "bits_per_weight": m["bits_per_weight"], "test_accuracy": m["test_accuracy"]}
                 for m in metrics]
    ax.set(xlabel="training step", ylabel="bits per weight", yscale="log",
           title="Self-compression: size over training (Fashion-MNIST)")
    ax.legend(title="size-loss weight (final accuracy)")
    ax.grid(alpha=0.3, which="both")
    harness.save_figure(fig, path)
    return data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fmnist_overrides", nargs="*",
                        help="extra Hydra overrides for the Fashion-MNIST points (as for bench_pareto.py)")
    parser.add_argument("--full", action="store_true", help="the GPU CIFAR-10 config")
    parser.add_argument("--cifar-root", default=None, help="dataset.root for CIFAR-10")
    parser.add_argument("--no-cifar", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results/figures")
    args = parser.parse_intermixed_args(argv)  # overrides and options in any order
    out = args.out

    fm = run_all(ROOT / "outputs/bench/fashion_mnist", "fashion_mnist_bench", FMNIST_POINTS,
                 args.fmnist_overrides)
    sweep_report.plot_pareto(fm, "bits_per_weight", out / "fig_accuracy_vs_size_fashion_mnist.png")
    sweep_report.plot_pareto(fm, "file_bytes", out / "fig_accuracy_vs_bytes_fashion_mnist.png", log_x=True)
    report.write_csv(out / "accuracy_vs_size_fashion_mnist.csv", aggregate.csv_rows(fm))
    over_training = fig_bits_over_training(fm, out / "fig_bits_over_training.png")
    report.write_csv(out / "bits_over_training.csv", over_training)

    best = aggregate.choose_run([r for r in fm if r["quant"] == "self_compress"
                                 and r.get("label") != "channel removal"])
    removal = next(r for r in fm if r["run_dir"] == "removal_recipe")
    tables = {  # title -> (csv stem, rows)
        f"Fashion-MNIST, SmallCNN (γ={best['gamma']:g})": ("fashion_mnist", layer_table(best["run_path"])),
        "Fashion-MNIST, SmallCNN, removal recipe":
            ("fashion_mnist_removal", layer_table(removal["run_path"]))}
    if not args.no_cifar:
        experiment = "cifar10_resnet" if args.full else "cifar10_resnet_cpu"
        runs = ROOT / "outputs/bench" / ("cifar10_gpu" if args.full else "cifar10_cpu")
        extra = [f"dataset.root={args.cifar_root}"] if args.cifar_root else []
        cifar = run_all(runs, experiment, CIFAR_POINTS, extra)
        report.write_csv(out / "accuracy_vs_size_cifar10.csv", aggregate.csv_rows(cifar))
        sweep_report.plot_pareto(cifar, "bits_per_weight", out / "fig_accuracy_vs_size_cifar10.png")
        for r in cifar:
            if r["run_dir"] != "none":
                stem = "cifar_10" + ("_removal" if r.get("label") == "channel removal" else "")
                tables[f"CIFAR-10, ResNet-9, {r['run_dir']}"] = (stem, layer_table(r["run_path"]))
    for stem, rows in tables.values():
        report.write_csv(out / f"layers_{stem}.csv", rows)
    tables = {title: rows for title, (_, rows) in tables.items()}
    fig_layers(tables, "bits", "mean stored bits per weight", "Bits per layer after self-compression",
               out / "fig_bits_per_layer.png")
    fig_layers(tables, "channels", "output channels", "Channels remaining per layer",
               out / "fig_channels_per_layer.png")
    print(f"figures written to {out}")


if __name__ == "__main__":
    main()
