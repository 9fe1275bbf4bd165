"""How far apart do a masked and a removal run of one recipe end? Picks the removal benchmark's recipe.

Masked and physical surgery train the same network (tests/test_surgery.py checks it in
float64), but in float32 they sum in different orders, and a self-compressing run amplifies
that round-off whenever a rounded bit depth or exponent flips. How much depends on the recipe.
For each recipe (size-loss weight gamma, b/e learning rate) and seed this runs the small CNN
(width 24, 8 epochs, Fashion-MNIST) with trainer.surgery=masked and =physical, and records
both final accuracies, the gap, the final parameter counts and the step of the first removal.

Forty-odd 8-epoch runs: meant for a GPU machine, several runs at once (--workers; each run is
its own process and Hydra-composed config). Writes docs/results/removal_recipes.json + .png.

    python scripts/removal_recipe_spread.py --workers 10 trainer.device=cuda trainer.amp=false
    python scripts/removal_recipe_spread.py --recipes g1.0_lq0.002 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from scn import io, report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["+experiment=fashion_mnist_cnn", "model.width=24"]
RECIPES = {  # name: (gamma, lr_quant)
    "g0.5_lq0.01": (0.5, 0.01), "g0.3_lq0.01": (0.3, 0.01), "g0.2_lq0.01": (0.2, 0.01),
    "g0.5_lq0.005": (0.5, 0.005), "g0.4_lq0.005": (0.4, 0.005), "g0.3_lq0.005": (0.3, 0.005),
    "g0.7_lq0.003": (0.7, 0.003), "g0.5_lq0.003": (0.5, 0.003), "g1.0_lq0.002": (1.0, 0.002),
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
    args = parser.parse_intermixed_args(argv)

    jobs = [(name, seed, mode) for seed in args.seeds for name in args.recipes
            for mode in ("masked", "physical")]

    def job(j: tuple[str, int, str]) -> dict:
        name, seed, mode = j
        gamma, lr_quant = RECIPES[name]
        overrides = [*COMMON, f"size_loss.gamma={gamma}", f"trainer.lr_quant={lr_quant}",
                     f"trainer.surgery={mode}", f"seed={seed}", *args.overrides]
        return run_one(overrides, args.runs / f"{name}_{mode}_s{seed}")

    with ThreadPoolExecutor(args.workers) as pool:
        finished = dict(zip(jobs, pool.map(job, jobs), strict=True))
    results = []
    for name in args.recipes:
        gamma, lr_quant = RECIPES[name]
        seeds = []
        for seed in args.seeds:
            masked, physical = finished[(name, seed, "masked")], finished[(name, seed, "physical")]
            seeds.append({"seed": seed, "masked": masked, "removal": physical,
                          "gap": masked["test_accuracy"] - physical["test_accuracy"]})
        gaps = [s["gap"] for s in seeds]
        results.append({"recipe": name, "gamma": gamma, "lr_quant": lr_quant, "seeds": seeds,
                        "mean_gap": statistics.mean(gaps), "max_abs_gap": max(map(abs, gaps))})
        print(f"{name:>14}: gaps {' '.join(f'{g:+.2f}' for g in gaps)}  max |gap| {max(map(abs, gaps)):.2f}")
    report.write_benchmark(args.out / "removal_recipes.json", "scripts/removal_recipe_spread.py",
                           sys.argv[1:] if argv is None else argv, results, common_overrides=COMMON)
    plot(results, args.out / "removal_recipes.png")


def plot(results: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, r in enumerate(results):
        gaps = [s["gap"] for s in r["seeds"]]
        ax.scatter([i] * len(gaps), gaps, color="tab:blue")
    ax.axhspan(-0.3, 0.3, color="tab:green", alpha=0.15, label="within 0.3 points")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xticks(range(len(results)), [f"γ={r['gamma']}\nlr_q={r['lr_quant']}" for r in results],
                  fontsize=7)
    ax.set_ylabel("masked − removal accuracy (points)")
    ax.set_title("Same recipe, same seed: masked vs removal final accuracy")
    ax.legend()
    fig.tight_layout()
    io.atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)


if __name__ == "__main__":
    main()
