"""Channel removal benchmark: does a network that removes its dead channels train and run faster?

One invocation, same data, model, seed and size-loss weight for every method:
  none     float training (the reference cost);
  masked   self-compression where dead channels stay in place (what public ports do);
  removal  self-compression with dead channels physically removed (scn's default), here in one
           surgery when the bit depths freeze, halfway (see SELF_COMPRESS).
(a) wall time of each full training run, the runs of one seed trained in turns of an epoch
so that the machine's drift falls on all alike (train_in_turns); (b) inference latency at
batch 1 and 256 on the CPU and FLOPs (torch.utils.flop_counter) of the final model (every run
ends with a physical surgery, so the masked run's final model is shrunk too); (c) the time of
one training step (batch 128) of the float model, of the float-shaped self-compressing model a
masked run trains to the end, and of the removal run's final model, timed in turns: the
per-step saving that removal earns. Writes docs/results/removal.json
and removal.png; run folders go under --runs and are reused when finished (resumable).

The masked and removal runs are bit-identical until the surgery; after it they compute the same
network in a different float summation order, so their round-off, and with it their training
paths, drift apart over the frozen half: their final accuracies differ by that noise alone.
`--seeds 0 1` repeats both with each seed (every seed's accuracy and wall time is in the JSON,
the means in the records); float runs once, as the reference for ratios.
Latency and FLOPs are measured on the first seed's final models.

    python scripts/bench_removal.py                   # 8 epochs, seed 0
    python scripts/bench_removal.py --seeds 0 1       # the committed numbers
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from pathlib import Path

import harness
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from scn import checkpoint
from scn.cli import build_experiment
from scn.quant import frozen
from scn.size import size_loss
from scn.sweep import compose_config, run_overrides
from scn.train import learns_bits

# A wider CNN and a firmer size-loss weight than the benchmarks' setting, so that enough channels die
# (about a third of the parameters) for removal to matter. The bit-depth/exponent learning rate
# is low on purpose: with trainer.lr_quant=0.01 the run is chaotic (rounded b and e flip back
# and forth) and two runs of the same method, or masked and removal with one seed, ended up to
# 3 points apart (docs/results/removal_recipes.json). Even at 0.002, on this project's CPU, the
# accuracy still jumped by 1-3 points between the last evaluations, and masked and removal
# ended 1.35 and 1.56 points apart; so both self-compressing runs freeze b and e for the second
# half of training (trainer.freeze_quant), and the weights settle on one bit allocation. Half,
# not a quarter: over 8 seeds on a GPU the quarter left gaps up to 2.38 points, the half 0.74,
# with a round-off-only control at 0.55 (docs/results/removal_recipes_freeze.json, _control.json).
# One surgery, at the freeze (trainer.prune_every=freeze: step 1872 of 8 epochs x 468 steps):
# frozen b and e kill no more channels, so that one surgery removes every channel the run will
# lose, and until it the masked and removal runs are bit-identical. Surgeries every 200 steps
# removed the first channels at step 1400 and let round-off drive the two runs apart through the
# last 500 steps of bit-depth learning: per-seed gaps of +0.41 and -0.31 points.
COMMON = ["+experiment=fashion_mnist_bench", "model.width=24", "size_loss.gamma=1.0",
          "trainer.lr_quant=0.002"]
SELF_COMPRESS = ["trainer.freeze_quant=0.5", "trainer.prune_every=freeze"]
METHODS = {
    "none": ["quant=none"],
    "masked": [*SELF_COMPRESS, "trainer.surgery=masked"],
    "removal": [*SELF_COMPRESS, "trainer.surgery=physical"],
}


def train_in_turns(jobs: dict[str, tuple[list[str], Path]], slice_steps: int) -> dict[str, dict]:
    """Train the runs `jobs` names (overrides, run folder) in turns, `slice_steps` steps each
    (trainer.pause_after_steps, then resume), until every one has finished; their summaries.

    Whole runs trained one after another took 863 and 952 s for one config on this project's
    CPU: its speed drifts by more than removal saves. In turns of a few minutes, a drift falls
    on every run alike. A paused run resumes to exactly the result of an uninterrupted one
    (tests/test_resume.py), and wall_time_s adds up the slices' training time (not the
    seconds each process spends starting and reading the data).
    """
    done: dict[str, dict] = {}
    while len(done) < len(jobs):
        for name, (overrides, run_dir) in jobs.items():
            if name not in done:
                summary = run_overrides([*overrides, f"trainer.pause_after_steps={slice_steps}"], run_dir)
                if summary["status"] != "paused":
                    done[name] = summary
    return {name: done[name] for name in jobs}


def flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def latencies_ms(models: dict[str, torch.nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median wall time of one forward pass of each model (deployed: weights quantized once).

    The models are timed in turns (A, B, C, A, B, C, ...) after a warm-up of each, so a drift
    in the machine's speed (clock, caches, other load) falls on every model alike instead of
    on whichever happened to be measured first.
    """
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for model in models.values():
            stack.enter_context(frozen(model))
        for i in range(repeats + 3):
            for name, model in models.items():
                t0 = time.perf_counter()
                model(x)
                if i >= 3:
                    times[name].append(time.perf_counter() - t0)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def train_step_ms(models: dict[str, torch.nn.Module], x: torch.Tensor, y: torch.Tensor,
                  repeats: int) -> dict[str, float]:
    """Median wall time of one training step of each model, timed in turns as latencies_ms.

    A step is the trainer's: forward with fake-quantized weights, cross-entropy plus the size
    loss where the model learns bits, backward, AdamW step (the lr is tiny so that the models do
    not drift from the shapes being timed; the cost of a step does not depend on it).
    """
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-9) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(repeats + 3):
        for name, model in models.items():
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            if learns_bits(model):
                loss = loss + size_loss(model)
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            if i >= 3:
                times[name].append(time.perf_counter() - t0)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def training_models(models: dict[str, torch.nn.Module], overrides: list[str]) -> dict[str, torch.nn.Module]:
    """The shapes each method trains at the end: float; masked (float shapes, quantized: a masked
    run keeps every channel until its last step); removal (its final, shrunk model)."""
    masked_cfg = compose_config([*COMMON, *METHODS["masked"], *overrides, "seed=0"])
    masked_shapes = build_experiment(masked_cfg).build_model()
    trained = {"none": copy.deepcopy(models["none"]), "masked": masked_shapes,
               "removal": copy.deepcopy(models["removal"])}
    return {name: m.train().to(memory_format=torch.channels_last) for name, m in trained.items()}


def _options(parser) -> None:
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="seeds of the masked and removal runs (means are compared)")
    parser.add_argument("--slice-steps", type=int, default=468,
                        help="steps each run trains per turn (468: one Fashion-MNIST epoch)")


def main(argv: list[str] | None = None) -> None:
    args = harness.arguments(__doc__, runs="outputs/bench/removal", argv=argv, add=_options)

    # Seed by seed (float once, with the first), the runs of one seed trained in turns.
    seeded: dict[str, list[dict]] = {m: [] for m in METHODS}
    for seed in args.seeds:
        jobs = {m: ([*COMMON, *o, *args.overrides, f"seed={seed}"],
                    args.runs / (m if seed == args.seeds[0] else f"{m}-seed{seed}"))
                for m, o in METHODS.items() if m != "none" or seed == args.seeds[0]}
        for m, summary in train_in_turns(jobs, args.slice_steps).items():
            seeded[m].append(summary)
    summaries = {m: runs[0] for m, runs in seeded.items()}
    _, header = checkpoint.load_checkpoint(Path(summaries["none"]["run_dir"]) / "model.safetensors")
    shape = (1, *header["dataset"]["input_shape"])
    models = {}
    for method, summary in summaries.items():
        model, _ = checkpoint.load_checkpoint(Path(summary["run_dir"]) / "model.safetensors")
        models[method] = model.eval().to(memory_format=torch.channels_last)
    x1 = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    x256 = torch.randn(256, *shape[1:]).contiguous(memory_format=torch.channels_last)
    latency_b1 = latencies_ms(models, x1, args.repeats * 10)
    latency_b256 = latencies_ms(models, x256, args.repeats)
    x128 = torch.randn(128, *shape[1:]).contiguous(memory_format=torch.channels_last)
    y128 = torch.randint(0, len(header["dataset"]["classes"]), (128,))
    step_ms = train_step_ms(training_models(models, args.overrides), x128, y128, args.repeats)
    results = []
    for method, summary in summaries.items():
        runs = seeded[method]
        results.append({
            "method": method,
            "wall_time_s": statistics.mean(r["wall_time_s"] for r in runs),
            "test_accuracy": statistics.mean(r["test_accuracy"] for r in runs),
            "seeds": [r["config"]["seed"] for r in runs],
            "wall_time_s_per_seed": [r["wall_time_s"] for r in runs],
            "test_accuracy_per_seed": [r["test_accuracy"] for r in runs],
            "bits_per_weight": summary["bits_per_weight"],
            "step_time_s": summary["step_time_s"],
            "param_count": summary["param_count"],
            "flops": flops(models[method], x1),
            "latency_b1_ms": latency_b1[method],
            "latency_b256_ms": latency_b256[method],
            "train_step_b128_ms": step_ms[method],
            "channels_left": summary["channels_left"],
            "run_dir": harness.relative(summary["run_dir"]),
        })
    base = results[0]
    for r in results:
        r["wall_time_ratio"] = r["wall_time_s"] / base["wall_time_s"]
        r["flop_ratio"] = r["flops"] / base["flops"]
        r["latency_b1_ratio"] = r["latency_b1_ms"] / base["latency_b1_ms"]
        r["latency_b256_ratio"] = r["latency_b256_ms"] / base["latency_b256_ms"]
        r["train_step_ratio"] = r["train_step_b128_ms"] / base["train_step_b128_ms"]
    harness.write(args, __file__, "removal", results, common_overrides=COMMON,
                  method_overrides=METHODS)
    plot(results, args.out / "removal.png")
    for r in results:
        print(f"{r['method']:>8}: train {r['wall_time_s']:7.1f}s ({r['wall_time_ratio']:.2f}x)  "
              f"acc {r['test_accuracy']:.2f}%  FLOPs {r['flop_ratio']:.3f}x  "
              f"latency b1 {r['latency_b1_ratio']:.3f}x  b256 {r['latency_b256_ratio']:.3f}x  "
              f"train step {r['train_step_ratio']:.3f}x")


def plot(results: list[dict], path: Path) -> None:
    keys = [("wall_time_ratio", "training wall time"), ("train_step_ratio", "train step, in turns"),
            ("flop_ratio", "FLOPs"),
            ("latency_b1_ratio", "latency, batch 1"), ("latency_b256_ratio", "latency, batch 256")]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        xs = [k + i * width for k in range(len(keys))]
        ax.bar(xs, [r[k] for k, _ in keys], width, label=f"{r['method']} ({r['test_accuracy']:.2f}%)")
    ax.set_xticks([k + width * (len(results) - 1) / 2 for k in range(len(keys))], [n for _, n in keys])
    ax.axhline(1.0, color="gray", ls="--")
    ax.set(ylabel="relative to float (lower is cheaper)",
           title="Channel removal: training and inference cost relative to float")
    ax.legend(title="method (test accuracy)")
    harness.save_figure(fig, path)


if __name__ == "__main__":
    main()
