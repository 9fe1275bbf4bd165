"""From a pretrained start: self-compression as fine-tuning against self-compression from scratch.

Four runs of the small CNN on Fashion-MNIST, same data and seed, in one
invocation: the float model (8 epochs, quant=none); self-compression fine-tuning it for 3
epochs (`+experiment=fashion_mnist_finetune model.init_from=<float run>/model.safetensors`),
with the benchmarks' size term (gamma 0.1) and with the channel-removal recipe's; and self-compression
from scratch (8 epochs, `+experiment=fashion_mnist_bench`). Run folders go under --runs and
finished ones are reused. Writes docs/results/pretrained.json and
pretrained.png.

    python scripts/bench_pretrained.py                  # the committed numbers (about 17 minutes here)
    python scripts/bench_pretrained.py --base-experiment fashion_mnist_removal   # another recipe
"""

from __future__ import annotations

from pathlib import Path

import harness
import matplotlib.pyplot as plt

REMOVAL = ["quant=self_compress_removal", "size_loss=kill_early", "trainer.lr_quant=0.02"]
KEYS = ("test_accuracy", "bits_per_weight", "float_bits_pct", "weights_left_pct", "param_count",
        "flops", "file_bytes", "wall_time_s", "step_time_s", "steps")


def _options(parser) -> None:
    parser.add_argument("--base-experiment", default="fashion_mnist_bench",
                        help="the from-scratch recipe (the fine-tune runs fashion_mnist_finetune)")
    parser.add_argument("--name", default="pretrained", help="result file stem in --out")


def main(argv: list[str] | None = None) -> None:
    args = harness.arguments(__doc__, runs="outputs/bench/pretrained", argv=argv, add=_options)
    base = [f"+experiment={args.base_experiment}"]
    float_run = harness.run_methods({"none": ["quant=none"]}, base, args)["none"]
    start = Path(float_run["run_dir"]) / "model.safetensors"
    finetunes = {"self_compress_finetune": [f"model.init_from={start}"],
                 # the channel-removal recipe's size term and schedule (docs/study/channel_removal.md)
                 "self_compress_removal_finetune": [f"model.init_from={start}", *REMOVAL]}
    summaries = {"none": float_run,
                 **harness.run_methods(finetunes, ["+experiment=fashion_mnist_finetune"], args),
                 **harness.run_methods({"self_compress_scratch": []}, base, args)}
    results = [harness.row(m, s, KEYS, epochs=s["config"]["trainer"]["max_epochs"],
                           start="float checkpoint" if "finetune" in m else "scratch")
               for m, s in summaries.items()]
    reference = results[0]
    for r in results:
        r["accuracy_drop_vs_float"] = reference["test_accuracy"] - r["test_accuracy"]
        # A fine-tune needs its float model first: both runs are what it costs from nothing.
        r["total_wall_time_s"] = r["wall_time_s"] + (reference["wall_time_s"]
                                                     if r["start"] == "float checkpoint" else 0.0)
    harness.write(args, __file__, args.name, results, base_experiment=args.base_experiment,
                  finetune_experiment="fashion_mnist_finetune")
    plot(results, args.out / f"{args.name}.png")
    for r in results:
        print(f"{r['method']:>30}: {r['test_accuracy']:6.2f}%  {r['bits_per_weight']:6.3f} bits/weight  "
              f"{r['weights_left_pct']:5.1f}% weights left  {r['wall_time_s'] / 60:5.1f} min "
              f"(total {r['total_wall_time_s'] / 60:.1f} min)")


def plot(results: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(1, 4, figsize=(18, 4.5))
    short = {"none": "float", "self_compress_finetune": "SC fine-tune",
             "self_compress_removal_finetune": "SC fine-tune\n(removal)",
             "self_compress_scratch": "SC scratch"}
    names = [short.get(r["method"], r["method"]) for r in results]
    harness.bar_panels(((ax[0], "test_accuracy", "test accuracy (%)"),
                        (ax[1], "bits_per_weight", "bits per weight"),
                        (ax[2], "weights_left_pct", "weights left (%)")), names, results)
    own = [r["wall_time_s"] / 60 for r in results]
    before = [(r["total_wall_time_s"] - r["wall_time_s"]) / 60 for r in results]
    ax[3].bar(names, before, label="float start")
    bars = ax[3].bar(names, own, bottom=before, label="this run")
    ax[3].bar_label(bars, labels=[f"{r['total_wall_time_s'] / 60:.1f}" for r in results])
    ax[3].set(title="wall time (min)")
    ax[3].legend(loc="lower right")
    for a in ax:
        a.tick_params(axis="x", labelsize=8)
    low = min(r["test_accuracy"] for r in results)
    ax[0].set_ylim(max(0.0, low - 5), 100)
    fig.suptitle("Fashion-MNIST, small CNN: float, self-compression from scratch and from a float start")
    harness.save_figure(fig, path)


if __name__ == "__main__":
    main()
