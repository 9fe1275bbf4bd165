"""What makes a channel die rather than shrink? The ablations of docs/study/channel_removal.md.

Every row is the default job (+experiment=fashion_mnist_cnn: the small CNN, 8 epochs, seed 0,
Fashion-MNIST) with one lever changed; rows run one after another (never two at once: wall
times are compared) into outputs/study/ROW, and a finished row is reused, so a killed study
resumes. Writes docs/results/channel_removal.json (the common benchmark shape) and prints the
table the study quotes.

    python experiments/channel_removal_study.py                 # every row (about 6 min each)
    python experiments/channel_removal_study.py --rows float base
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import harness  # noqa: E402

from scn.sweep import run_overrides  # noqa: E402

# (row, lever, overrides on top of the default job as it was before the study)
BEFORE = ["quant.live_input_grad=0", "quant.live_input_spread=flat", "size_loss=linear_warmup",
          "size_loss.gamma=0.1", "size_loss.warmup=0.2", "trainer.freeze_quant=0"]
ROWS = [
    ("float", "float32 reference", ["quant=none"]),
    ("base_g0.1", "scn's original term, gamma 0.1 (the default job before)", []),
    ("base_g1", "original term, gamma 1: ten times the pressure", ["size_loss.gamma=1"]),
    ("lig1_g0.1", "live-input charge, flat", ["quant.live_input_grad=1"]),
    ("lig1_perbit_g0.1", "live-input charge, per bit",
     ["quant.live_input_grad=1", "quant.live_input_spread=per_bit"]),
    ("lig1_cos0.2", "flat charge, cosine gamma 0.2 decaying to 0",
     ["quant.live_input_grad=1", "size_loss=cosine", "size_loss.gamma=0.2", "size_loss.warmup=0.1",
      "size_loss.final=0"]),
    ("lig1_g0.1_freeze", "flat charge, b and e frozen for the last quarter",
     ["quant.live_input_grad=1", "trainer.freeze_quant=0.25"]),
]
KEYS = (*harness.SUMMARY_KEYS, "flops", "flops_original", "channels_left")


def merged(*lists: list[str]) -> list[str]:
    """Overrides with a later value of a key replacing an earlier one (Hydra refuses both)."""
    out: dict[str, str] = {}
    for item in (o for lst in lists for o in lst):
        out[item.partition("=")[0]] = item
    return list(out.values())


def main(argv: list[str] | None = None) -> None:
    args = harness.arguments(__doc__, runs="outputs/study", argv=argv, add=lambda p: p.add_argument(
        "--rows", nargs="*", default=None, help="rows to run (default: all)"))
    results = []
    for name, lever, overrides in ROWS:
        if args.rows is not None and name not in args.rows:
            continue
        before = [o for o in BEFORE if not (o.startswith("quant.") and "quant=none" in overrides)]
        ov = ["+experiment=fashion_mnist_cnn", *merged(before, overrides, args.overrides)]
        summary = run_overrides(ov, args.runs / name)
        results.append(harness.row(name, summary, KEYS, lever=lever,
                                   overrides=" ".join(overrides)))
    path = harness.write(args, __file__, "channel_removal", results)
    for r in results:
        flops = r["flops"] / r["flops_original"] if r.get("flops") else float("nan")
        print(f"{r['method']:>18} {r['test_accuracy']:6.2f}% {r['bits_per_weight']:6.3f} b/w "
              f"{r['weights_left_pct']:5.1f}% weights {flops:5.3f}x FLOPs {r['wall_time_s']:6.0f} s")
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:] if len(sys.argv) > 1 else None)
