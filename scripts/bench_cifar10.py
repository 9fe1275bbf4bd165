"""CIFAR-10 benchmark on the CPU config: float, self-compression and its removal recipes, side by side.

Every method runs `+experiment=cifar10_resnet_cpu` (ResNet-9 at width 16; its own recipe is the
`self_compress_removal_budget` method, the others override it) with the same data, seed and
epochs, through the same code path as scn-train; run folders go under --runs and are reused
when finished (resumable). Writes docs/results/cifar10_cpu.json and .png.
Pass the data location as an override:

    python scripts/bench_cifar10.py dataset.root=DIR
    python scripts/bench_cifar10.py dataset.root=DIR --experiment cifar10_resnet --name cifar10_gpu
"""

from __future__ import annotations

from pathlib import Path

import harness
import matplotlib.pyplot as plt

# Self-compression first: they are the runs whose outcome is in doubt. The experiment's own
# recipe (the ninth round's: survivors at 5 bits or more, the network stops shrinking at half its
# weights) is the first method; the others start from PLAIN, the experiment's settings before that
# recipe (plain self-compression at gamma 0.05, no size budget), so that their runs stay the ones
# the earlier rounds measured.
PLAIN = ["quant=self_compress", "size_loss.gamma=0.05", "trainer.stop_shrinking_at=0"]
# The removal recipe charges each channel the columns it keeps alive (docs/study/channel_removal.md)
# at about a quarter of plain gamma (with quant.min_bits=2 it removed less here: docs/results.md).
REMOVAL = ["quant=self_compress_removal", "quant.live_input_grad=10", "size_loss.gamma=0.012"]
# The study's seventh round: live channels at 3 bits or more from 6, exponents refit to least
# squares at every surgery check (without the refit, channels starting at 6 bits clip to signs).
REMOVAL_REFIT = [*REMOVAL, "quant.min_bits=3", "quant.init_bits=6", "quant.exponent_refit=true"]
METHODS = {"self_compress_removal_budget": [], "self_compress_removal_refit": [*PLAIN, *REMOVAL_REFIT],
           "self_compress_removal": [*PLAIN, *REMOVAL], "self_compress": PLAIN,
           "none": [*PLAIN, "quant=none"]}


def label(dataset_name: str) -> str:
    return "CIFAR-10 (JPEG copy)" if dataset_name == "cifar10-jpeg" else "CIFAR-10"


def _options(parser) -> None:
    parser.add_argument("--experiment", default="cifar10_resnet_cpu")
    parser.add_argument("--name", default="cifar10_cpu", help="result file stem in --out")
    parser.add_argument("--runs", type=Path, default=None, help="default: outputs/bench/<name>")


def main(argv: list[str] | None = None) -> None:
    args = harness.arguments(__doc__, runs=None, argv=argv, add=_options,
                             overrides_help="Hydra overrides for both methods")
    runs = args.runs or harness.ROOT / "outputs/bench" / args.name
    summaries = harness.run_methods(METHODS, [f"+experiment={args.experiment}"], args, runs)
    keys = ("test_accuracy", "bits_per_weight", "float_bits_pct", "weights_left_pct", "param_count",
            "file_bytes", "wall_time_s", "images_per_s", "step_time_s", "channels_left")
    results = [harness.row(m, s, keys, dataset=label(s.get("dataset_name", "")))
               for m, s in summaries.items()]
    harness.write(args, __file__, args.name, results, experiment=args.experiment)
    plot(results, args.out / f"{args.name}.png")
    for r in results:
        print(f"{r['method']:>14}: {r['test_accuracy']:.2f}%  {r['bits_per_weight']:.3f} bits/weight "
              f"({r['float_bits_pct']:.2f}% of float)  {r['weights_left_pct']:.1f}% weights left  "
              f"{r['wall_time_s'] / 60:.1f} min  {r['images_per_s']:.0f} img/s  [{r['dataset']}]")


def plot(results: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(1, 3, figsize=(13, 4))
    names = [r["method"] for r in results]
    harness.bar_panels(((ax[0], "test_accuracy", "test accuracy (%)"),
                        (ax[1], "float_bits_pct", "size (% of float32 bits)"),
                        (ax[2], "weights_left_pct", "weights left (%)")), names, results)
    fig.suptitle(f"{results[0]['dataset']}: float vs self-compression (ResNet-9)")
    harness.save_figure(fig, path)


if __name__ == "__main__":
    main()
