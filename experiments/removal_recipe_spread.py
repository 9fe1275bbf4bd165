"""How far apart do a masked and a removal run of one recipe end? Picks the removal benchmark's recipe.

Masked and physical surgery train the same network (tests/test_surgery.py checks it in
float64), but in float32 they sum in different orders, and a self-compressing run amplifies
that round-off whenever a rounded bit depth or exponent flips. How much depends on the recipe.
For each recipe (size-loss weight gamma, b/e learning rate, fraction of training at the end with
b and e frozen) and seed this runs the small CNN
(width 24, 8 epochs, Fashion-MNIST) with trainer.surgery=masked and =physical, and records
both final accuracies, the gap, the final parameter counts and the step of the first removal.

Forty-odd 8-epoch runs: meant for a GPU machine, several runs at once (--workers; each run is
its own process and Hydra-composed config). Writes docs/results/removal_recipes.json + .png.

    python experiments/removal_recipe_spread.py --workers 10 trainer.device=cuda trainer.amp=false
    python experiments/removal_recipe_spread.py --recipes g1.0_lq0.002 --seeds 0 1 2
    python experiments/removal_recipe_spread.py --recipes g1.0_lq0.002_f0.25 g1.0_lq0.002_f0.5 \
        --seeds 0 1 2 3 4 5 6 7 --workers 12 --budget-s 330 --name removal_recipes_freeze \
        trainer.device=cuda trainer.amp=false

--control adds a third run per seed, masked again but with trainer.channels_last=false: the same
arithmetic in another memory layout, so other kernels and another summation order and nothing
else. Its gap to the masked run (control_gap) is how far round-off alone moves a final accuracy,
the yardstick for the masked-vs-removal gap.

--budget-s bounds a call on a lent machine: no run starts after it, and a seed whose masked or
removal run did not start is left out of the results (so the file only holds complete pairs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from scn import io, report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["+experiment=fashion_mnist_bench", "model.width=24"]
RECIPES = {  # name: (gamma, lr_quant, freeze_quant)
    "g0.5_lq0.01": (0.5, 0.01, 0.0), "g0.3_lq0.01": (0.3, 0.01, 0.0), "g0.2_lq0.01": (0.2, 0.01, 0.0),
    "g0.5_lq0.005": (0.5, 0.005, 0.0), "g0.4_lq0.005": (0.4, 0.005, 0.0),
    "g0.3_lq0.005": (0.3, 0.005, 0.0), "g0.7_lq0.003": (0.7, 0.003, 0.0),
    "g0.5_lq0.003": (0.5, 0.003, 0.0), "g1.0_lq0.002": (1.0, 0.002, 0.0),
    "g1.0_lq0.002_f0.25": (1.0, 0.002, 0.25), "g1.0_lq0.002_f0.5": (1.0, 0.002, 0.5),
}
MODES = {  # mode: the overrides that make it
    "masked": ["trainer.surgery=masked"],
    "physical": ["trainer.surgery=physical"],
    "masked_nchw": ["trainer.surgery=masked", "trainer.channels_last=false"],  # --control
}
# One run in a process of its own, so that runs can go side by side on one GPU.
CHILD = """
import json, sys
from scn.sweep import run_overrides
s = run_overrides(json.loads(sys.argv[1]), sys.argv[2])
print("SUMMARY " + json.dumps({k: s.get(k) for k in ("test_accuracy", "bits_per_weight", "param_count")}))
"""


def run_one(overrides: list[str], run_dir: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(overrides), str(run_dir)],
                          capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("SUMMARY "):
            summary = json.loads(line[len("SUMMARY "):])
            rows = report.read_csv(run_dir / "metrics.csv")
            first = next((int(r["step"]) for r in rows if r["param_count"] < rows[0]["param_count"]), None)
            return {**summary, "first_removal_step": first}
    raise RuntimeError(f"run {run_dir} failed:\n{done.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=1, help="runs at once (1 on a CPU)")
    parser.add_argument("--runs", type=Path, default=ROOT / "outputs/bench/removal_recipes")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results")
    parser.add_argument("--name", default="removal_recipes", help="stem of the .json and .png written")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="start no run after this many seconds (bounds a call on a lent machine)")
    parser.add_argument("--control", action="store_true",
                        help="also run masked in NCHW layout: the round-off-only gap, for scale")
    args = parser.parse_intermixed_args(argv)
    deadline = time.monotonic() + args.budget_s

    modes = ["masked", "physical", "masked_nchw"] if args.control else ["masked", "physical"]
    jobs = [(name, seed, mode) for seed in args.seeds for name in args.recipes for mode in modes]

    def job(j: tuple[str, int, str]) -> dict | None:
        name, seed, mode = j
        if time.monotonic() > deadline:
            return None
        gamma, lr_quant, freeze_quant = RECIPES[name]
        overrides = [*COMMON, f"size_loss.gamma={gamma}", f"trainer.lr_quant={lr_quant}",
                     f"trainer.freeze_quant={freeze_quant}", *MODES[mode],
                     f"seed={seed}", *args.overrides]
        return run_one(overrides, args.runs / f"{name}_{mode}_s{seed}")

    with ThreadPoolExecutor(args.workers) as pool:
        finished = dict(zip(jobs, pool.map(job, jobs), strict=True))
    results = []
    for name in args.recipes:
        gamma, lr_quant, freeze_quant = RECIPES[name]
        seeds = []
        for seed in args.seeds:
            runs = {mode: finished[(name, seed, mode)] for mode in modes}
            if None in runs.values():  # not started within --budget-s
                continue
            masked, physical = runs["masked"], runs["physical"]
            seeds.append({"seed": seed, "masked": masked, "removal": physical,
                          "gap": masked["test_accuracy"] - physical["test_accuracy"]})
            if args.control:
                seeds[-1].update(control=runs["masked_nchw"], control_gap=masked["test_accuracy"]
                                 - runs["masked_nchw"]["test_accuracy"])
        if not seeds:
            continue
        gaps = [s["gap"] for s in seeds]
        results.append({"recipe": name, "gamma": gamma, "lr_quant": lr_quant,
                        "freeze_quant": freeze_quant, "seeds": seeds,
                        "mean_gap": statistics.mean(gaps), "max_abs_gap": max(map(abs, gaps))})
        print(f"{name:>14}: gaps {' '.join(f'{g:+.2f}' for g in gaps)}  max |gap| {max(map(abs, gaps)):.2f}")
        if args.control:
            control = [s["control_gap"] for s in seeds]
            results[-1].update(mean_control_gap=statistics.mean(control),
                               max_abs_control_gap=max(map(abs, control)))
            print(f"{'control':>14}: gaps {' '.join(f'{g:+.2f}' for g in control)}")
    report.write_benchmark(args.out / f"{args.name}.json", "experiments/removal_recipe_spread.py",
                           sys.argv[1:] if argv is None else argv, results, common_overrides=COMMON)
    plot(results, args.out / f"{args.name}.png")


def plot(results: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, r in enumerate(results):
        gaps = [s["gap"] for s in r["seeds"]]
        ax.scatter([i] * len(gaps), gaps, color="tab:blue", label="masked − removal" if i == 0 else None)
        control = [s["control_gap"] for s in r["seeds"] if "control_gap" in s]
        if control:
            ax.scatter([i + 0.2] * len(control), control, color="tab:orange", marker="x",
                       label="masked − masked in NCHW (round-off only)" if i == 0 else None)
    ax.axhspan(-0.3, 0.3, color="tab:green", alpha=0.15, label="within 0.3 points")
    ax.axhline(0, color="black", lw=0.5)
    labels = [f"γ={r['gamma']}\nlr_q={r['lr_quant']}" + (f"\nfreeze {r['freeze_quant']}"
               if r.get("freeze_quant") else "") for r in results]
    ax.set_xticks(range(len(results)), labels, fontsize=7)
    ax.set_xlim(-0.6, len(results) - 0.2)
    ax.set_ylabel("accuracy gap (points)")
    ax.set_title("Same recipe, same seed: how far apart two runs end")
    ax.legend()
    fig.tight_layout()
    io.atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)


if __name__ == "__main__":
    main()
