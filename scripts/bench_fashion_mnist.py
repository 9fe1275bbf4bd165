"""Fashion-MNIST benchmark: float, fixed 8-bit, fixed 4-bit and self-compression, side by side.

Same model, data, epochs and seed for every method, in one invocation. Each method trains
through the same code path as `scn-train +experiment=fashion_mnist_bench quant=...`; its run
folder lands under --runs (a finished run with the same config is reused, so a killed
benchmark resumes). Writes docs/results/fashion_mnist.json and fashion_mnist.png.

    python scripts/bench_fashion_mnist.py            # the committed numbers (about 12 minutes here)
    python scripts/bench_fashion_mnist.py trainer.max_epochs=1 --out /tmp/fm   # a quick look
"""

from __future__ import annotations

from pathlib import Path

import harness
import matplotlib.pyplot as plt

METHODS = {
    "none": ["quant=none"],
    "fixed8": ["quant=fixed", "quant.init_bits=8"],
    "fixed4": ["quant=fixed", "quant.init_bits=4"],
    "self_compress": ["quant=self_compress"],
}


def main(argv: list[str] | None = None) -> None:
    args = harness.arguments(__doc__, runs="outputs/bench/fashion_mnist", argv=argv)
    summaries = harness.run_methods(METHODS, ["+experiment=fashion_mnist_bench"], args)
    keys = ("test_accuracy", "bits_per_weight", "step_time_s", "float_bits_pct", "weights_left_pct",
            "param_count", "file_bytes", "wall_time_s")
    results = [harness.row(method, s, keys) for method, s in summaries.items()]
    base = next(r for r in results if r["method"] == "none")
    for r in results:
        r["accuracy_drop_vs_float"] = base["test_accuracy"] - r["test_accuracy"]
        r["step_time_ratio_vs_float"] = r["step_time_s"] / base["step_time_s"]
    harness.write(args, __file__, "fashion_mnist", results)
    plot(results, args.out / "fashion_mnist.png")
    for r in results:
        print(f"{r['method']:>14}: {r['test_accuracy']:6.2f}%  {r['bits_per_weight']:6.3f} bits/weight  "
              f"step {r['step_time_s'] * 1000:6.1f} ms ({r['step_time_ratio_vs_float']:.2f}x float)")


def plot(results: list[dict], path: Path) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results:
        a.scatter(r["bits_per_weight"], r["test_accuracy"], s=50)
        a.annotate(r["method"], (r["bits_per_weight"], r["test_accuracy"]),
                   textcoords="offset points", xytext=(5, 5))
    a.set(xscale="log", xlabel="bits per weight (every parameter counted, log scale)",
          ylabel="test accuracy (%)", title="Fashion-MNIST: accuracy vs size")
    a.grid(alpha=0.3, which="both")
    b.bar([r["method"] for r in results], [r["step_time_ratio_vs_float"] for r in results])
    b.axhline(1.0, color="gray", ls="--")
    b.set(ylabel="training step time / float step time", title="training cost per step")
    harness.save_figure(fig, path)


if __name__ == "__main__":
    main()
