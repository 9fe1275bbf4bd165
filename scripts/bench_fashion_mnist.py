"""Fashion-MNIST benchmark: float, fixed 8-bit, fixed 4-bit and self-compression, side by side.

Same model, data, epochs and seed for every method, in one invocation. Each method trains
through the same code path as `scn-train +experiment=fashion_mnist_cnn quant=...`; its run
folder lands under --runs (a finished run with the same config is reused, so a killed
benchmark resumes). Writes docs/results/fashion_mnist.json and fashion_mnist.png.

    python scripts/bench_fashion_mnist.py            # the committed numbers (about 12 minutes here)
    python scripts/bench_fashion_mnist.py trainer.max_epochs=1 --out /tmp/fm   # a quick look
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from scn import io, report  # noqa: E402
from scn.sweep import run_overrides  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "none": ["quant=none"],
    "fixed8": ["quant=fixed", "quant.init_bits=8"],
    "fixed4": ["quant=fixed", "quant.init_bits=4"],
    "self_compress": ["quant=self_compress"],
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every method")
    parser.add_argument("--runs", type=Path, default=ROOT / "outputs/bench/fashion_mnist")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results")
    args = parser.parse_intermixed_args(argv)  # overrides and options in any order

    results = []
    for method, overrides in METHODS.items():
        summary = run_overrides(["+experiment=fashion_mnist_cnn", *overrides, *args.overrides],
                                args.runs / method)
        results.append({
            "method": method,
            "test_accuracy": summary["test_accuracy"],
            "bits_per_weight": summary["bits_per_weight"],
            "step_time_s": summary["step_time_s"],
            "float_bits_pct": summary["float_bits_pct"],
            "weights_left_pct": summary["weights_left_pct"],
            "param_count": summary["param_count"],
            "file_bytes": summary.get("file_bytes"),
            "wall_time_s": summary["wall_time_s"],
            "run_dir": str(Path(summary["run_dir"]).resolve().relative_to(ROOT))
            if Path(summary["run_dir"]).resolve().is_relative_to(ROOT) else summary["run_dir"],
        })
    base = next(r for r in results if r["method"] == "none")
    for r in results:
        r["accuracy_drop_vs_float"] = base["test_accuracy"] - r["test_accuracy"]
        r["step_time_ratio_vs_float"] = r["step_time_s"] / base["step_time_s"]
    report.write_benchmark(args.out / "fashion_mnist.json", "scripts/bench_fashion_mnist.py",
                           sys.argv[1:] if argv is None else argv, results)
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
    fig.tight_layout()
    io.atomic_write(path, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)


if __name__ == "__main__":
    main()
