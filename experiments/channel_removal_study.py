"""What makes a channel die rather than shrink? The ablations of docs/study/channel_removal.md.

Every row is the benchmarks' setting (+experiment=fashion_mnist_bench: the small CNN, 8 epochs,
seed 0, Fashion-MNIST) with one lever changed; rows run one after another (never two at once: wall
times are compared) into outputs/study/ROW, and a finished row is reused, so a killed study
resumes. Writes docs/results/channel_removal.json (the common benchmark shape) and prints the
table the study quotes.

    python experiments/channel_removal_study.py                 # every row (about 6 min each)
    python experiments/channel_removal_study.py --rows float base_g0.1 --name channel_removal_some
    python experiments/channel_removal_study.py dataset.root=DIR --cifar10 --runs outputs/study_cifar \
        --name channel_removal_cifar10      # every CIFAR-10 row (seventh and eighth rounds)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_cifar10  # noqa: E402
import harness  # noqa: E402

from scn import format as scn_format  # noqa: E402
from scn.sweep import run_overrides  # noqa: E402

# (row, lever, overrides on top of fashion_mnist_bench, the default job before the study)
BEFORE = ["quant.live_input_grad=0", "quant.live_input_spread=flat", "size_loss=linear_warmup",
          "size_loss.gamma=0.1", "size_loss.warmup=0.2", "trainer.freeze_quant=0"]
RECIPE = ["quant.live_input_grad=1", "quant.live_input_spread=per_bit", "size_loss=cosine",
          "size_loss.gamma=0.3", "size_loss.warmup=0.1", "size_loss.final=0", "trainer.lr_quant=0.02"]


def per_bit(weight: str, gamma: str) -> list[str]:
    """The live-input charge spread per bit, at `weight`, with size-loss weight `gamma`."""
    return [f"quant.live_input_grad={weight}", "quant.live_input_spread=per_bit",
            f"size_loss.gamma={gamma}"]


def merged(*lists: list[str]) -> list[str]:
    """Overrides with a later value of a key replacing an earlier one (Hydra refuses both)."""
    out: dict[str, str] = {}
    for item in (o for lst in lists for o in lst):
        out[item.partition("=")[0]] = item
    return list(out.values())


# The benchmark's recipe (+experiment=fashion_mnist_paper_regime) as overrides on fashion_mnist_bench,
# at width 32 (its width until the thirteenth round).
PAPER = ["model.width=32", *RECIPE, "quant.min_bits=2", "trainer.stop_shrinking_at=25",
         "trainer.budget_bits=2", "trainer.prune_every=50"]
# Since the thirteenth round, at width 48; final=0.0 as the experiment has it, so the config hashes agree.
PAPER48 = merged(PAPER, ["model.width=48", "size_loss.final=0.0"])


def shape(channels: list[int], seed: int = 0) -> tuple[str, str, list[str]]:
    """A float CNN from scratch at `channels`: what a shape of the twelfth round is worth as float."""
    name = "_".join(map(str, channels)) + (f"_seed{seed}" if seed else "")
    return (f"w32_float_shape_{name}", f"float32, width 32, from scratch at the channels {channels}"
            + (f", seed {seed}" if seed else ""),
            ["model.width=32", "quant=none", f"+model.channels=[{','.join(map(str, channels))}]",
             *([f"seed={seed}"] if seed else [])])


def flops(strength: str, suffix: str = "", *more: str) -> tuple[str, str, list[str]]:
    """The eleventh round's row: the paper regime's recipe, the FLOPs charge at `strength`, and
    `more` overrides (replacing the recipe's value of a key)."""
    return (f"w32_paper_flops{strength}{suffix}",
            f"the paper regime's recipe, FLOPs charge {strength} {' '.join(more)}".strip(),
            merged(PAPER, [f"quant.flops_charge={strength}", *more]))


ROWS = [
    ("float", "float32 reference", ["quant=none"]),
    ("base_g0.1", "scn's original term, gamma 0.1 (the default job before the study)", []),
    ("base_g1", "original term, gamma 1: ten times the pressure", ["size_loss.gamma=1"]),
    ("lig1_g0.1", "live-input charge, flat", ["quant.live_input_grad=1"]),
    ("lig1_g0.1_freeze", "flat charge, b and e frozen for the last quarter",
     ["quant.live_input_grad=1", "trainer.freeze_quant=0.25"]),
    ("lig1_perbit_g0.1", "live-input charge, per bit",
     ["quant.live_input_grad=1", "quant.live_input_spread=per_bit"]),
    ("lig3_perbit_g0.03", "per-bit charge x3, gamma 0.03: less pull on bits, as much on channels",
     per_bit("3", "0.03")),
    ("lig1_perbit_cos0.3", "per-bit charge, cosine gamma 0.3 decaying to 0 (kill early, recover)",
     ["quant.live_input_grad=1", "quant.live_input_spread=per_bit", "size_loss=cosine",
      "size_loss.gamma=0.3", "size_loss.warmup=0.1", "size_loss.final=0"]),
    ("lig1_perbit_cos0.3_init6", "the recipe (previous row) starting at 6 bits instead of 3",
     ["quant.live_input_grad=1", "quant.live_input_spread=per_bit", "size_loss=cosine",
      "size_loss.gamma=0.3", "size_loss.warmup=0.1", "size_loss.final=0", "quant.init_bits=6"]),
    ("lig1_perbit_cos0.3_lrq0.02", "the recipe with four times the bit-depth learning rate", RECIPE),
    ("lig1_perbit_cos0.3_lrq0.02_const", "the recipe with the bit depths' lr constant after its "
     "warm-up, not decaying with the weights' (trainer.quant_lr_schedule=constant)",
     [*RECIPE, "trainer.quant_lr_schedule=constant"]),
    ("lig1_perbit_cos0.3_lrq0.02_const_freeze", "the previous row, b and e frozen for the last quarter",
     [*RECIPE, "trainer.quant_lr_schedule=constant", "trainer.freeze_quant=0.25"]),
    ("lig10_perbit_g0.01", "per-bit charge x10, gamma 0.01: the channel charge of lig1_perbit_g0.1 "
     "with a tenth of its pull on bits",
     per_bit("10", "0.01")),
    ("lig10_perbit_g0.02", "per-bit charge x10, gamma 0.02: twice the previous row's pressure",
     per_bit("10", "0.02")),
    ("lig30_perbit_g0.005", "per-bit charge x30, gamma 0.005: the channel pull of "
     "lig1_perbit_g0.1 with a twentieth of its pull on bits",
     per_bit("30", "0.005")),
    ("lig60_perbit_g0.005", "per-bit charge x60, gamma 0.005: twice the previous row's channel pull",
     per_bit("60", "0.005")),
    ("float_arch_lig30", "float32 from scratch at the channels lig30_perbit_g0.005 ended with",
     ["quant=none", "+model.channels=[15,29,32,24]"]),
    ("float_arch_lig10_g0.02", "float32 from scratch at the channels lig10_perbit_g0.02 ended with",
     ["quant=none", "+model.channels=[15,29,31,14]"]),
    ("float_arch_recipe", "float32 from scratch at the channels the recipe ended with (round 1)",
     ["quant=none", "+model.channels=[12,16,19,9]"]),
    ("float_w8", "float32, width 8 (channels 8, 16, 16, 32: half of every layer)",
     ["quant=none", "model.width=8"]),
    ("base_min2_g0.1", "the original term with live channels held at 2 bits or more "
     "(quant.min_bits=2)", ["quant.min_bits=2"]),
    ("lig10_perbit_g0.01_min2", "lig10_perbit_g0.01 with quant.min_bits=2",
     [*per_bit("10", "0.01"), "quant.min_bits=2"]),
    ("lig30_perbit_g0.005_min2", "lig30_perbit_g0.005 with quant.min_bits=2",
     [*per_bit("30", "0.005"), "quant.min_bits=2"]),
    ("lig5_perbit_g0.01_min2", "half the charge of lig10_perbit_g0.01_min2",
     [*per_bit("5", "0.01"), "quant.min_bits=2"]),
    ("lig10_perbit_g0.01_min3", "lig10_perbit_g0.01 with live channels held at 3 bits or more",
     [*per_bit("10", "0.01"), "quant.min_bits=3"]),
    ("lig7_perbit_g0.01_min2", "between lig5_perbit_g0.01_min2 and lig10_perbit_g0.01_min2",
     [*per_bit("7", "0.01"), "quant.min_bits=2"]),
    ("lig8.5_perbit_g0.01_min2", "between lig7_perbit_g0.01_min2 and lig10_perbit_g0.01_min2",
     [*per_bit("8.5", "0.01"), "quant.min_bits=2"]),
    ("lig1_perbit_cos0.3_lrq0.02_min2", "the recipe (lig1_perbit_cos0.3_lrq0.02) with "
     "quant.min_bits=2", [*RECIPE, "quant.min_bits=2"]),
    ("lig8.5_perbit_g0.01_min2_seed1", "lig8.5_perbit_g0.01_min2, seed 1 (the spread)",
     [*per_bit("8.5", "0.01"), "quant.min_bits=2", "seed=1"]),
    ("lig10_perbit_g0.01_min2_seed1", "lig10_perbit_g0.01_min2, seed 1 (the spread)",
     [*per_bit("10", "0.01"), "quant.min_bits=2", "seed=1"]),
    ("lig10_perbit_g0.01_min3_init6", "live channels held at 3 bits or more, starting at 6",
     [*per_bit("10", "0.01"), "quant.min_bits=3", "quant.init_bits=6"]),
    ("lig20_perbit_g0.01_min3_init6", "the previous row with twice the charge",
     [*per_bit("20", "0.01"), "quant.min_bits=3", "quant.init_bits=6"]),
    ("lig5_perbit_g0.01_min3_init6", "lig10_perbit_g0.01_min3_init6 with half the charge",
     [*per_bit("5", "0.01"), "quant.min_bits=3", "quant.init_bits=6"]),
    ("lig7_perbit_g0.01_min3_init6", "between the charges 5 and 10, min 3 bits from 6",
     [*per_bit("7", "0.01"), "quant.min_bits=3", "quant.init_bits=6"]),
    ("lig10_perbit_g0.01_min2_freeze0.5", "lig10_perbit_g0.01_min2 with b and e frozen for the "
     "second half: no channel dies after epoch 4, the small network trains on",
     [*per_bit("10", "0.01"), "quant.min_bits=2", "trainer.freeze_quant=0.5"]),
    ("lig10_perbit_g0.01_min2_freeze0.375", "the same, frozen for the last three epochs",
     [*per_bit("10", "0.01"), "quant.min_bits=2", "trainer.freeze_quant=0.375"]),
    ("lig15_perbit_g0.01_min2_freeze0.5", "more charge, frozen for the second half",
     [*per_bit("15", "0.01"), "quant.min_bits=2", "trainer.freeze_quant=0.5"]),
    ("lig8_perbit_g0.01_min3_init6", "between the charges 7 and 10, min 3 bits from 6",
     [*per_bit("8", "0.01"), "quant.min_bits=3", "quant.init_bits=6"]),
    ("lig8.5_perbit_g0.01_min3_init6", "charge 8.5, min 3 bits from 6",
     [*per_bit("8.5", "0.01"), "quant.min_bits=3", "quant.init_bits=6"]),
    ("lig10_perbit_g0.01_min3_init6_freeze0.375", "lig10_perbit_g0.01_min3_init6 with b and e "
     "frozen for the last three epochs",
     [*per_bit("10", "0.01"), "quant.min_bits=3", "quant.init_bits=6", "trainer.freeze_quant=0.375"]),
    ("lig10_perbit_g0.01_min2_init4", "lig10_perbit_g0.01_min2 starting at 4 bits",
     [*per_bit("10", "0.01"), "quant.min_bits=2", "quant.init_bits=4"]),
    ("lig10_perbit_g0.01_min2_lrq0.0025", "lig10_perbit_g0.01_min2 with half the bit-depth "
     "learning rate", [*per_bit("10", "0.01"), "quant.min_bits=2", "trainer.lr_quant=0.0025"]),
    ("w24_float", "float32, width 24", ["model.width=24", "quant=none"]),
    ("w24_lig8.5_perbit_g0.01_min2", "width 24, lig8.5_perbit_g0.01_min2",
     ["model.width=24", *per_bit("8.5", "0.01"), "quant.min_bits=2"]),
    ("w24_lig10_perbit_g0.01_min2", "width 24, lig10_perbit_g0.01_min2",
     ["model.width=24", *per_bit("10", "0.01"), "quant.min_bits=2"]),
    ("w24_lig15_perbit_g0.01_min2", "width 24, charge x15, min 2",
     ["model.width=24", *per_bit("15", "0.01"), "quant.min_bits=2"]),
    ("w24_lig20_perbit_g0.01_min2", "width 24, charge x20, min 2",
     ["model.width=24", *per_bit("20", "0.01"), "quant.min_bits=2"]),
    ("lig10_perbit_g0.01_smooth", "charge x10, the real b in the forward pass (round_bits=false, "
     "ceil(b) bits on disk)", [*per_bit("10", "0.01"), "quant.round_bits=false"]),
    ("float_e16", "float32, 16 epochs", ["quant=none", "trainer.max_epochs=16"]),
    ("lig8.5_perbit_g0.01_min2_e16", "lig8.5_perbit_g0.01_min2 over 16 epochs",
     [*per_bit("8.5", "0.01"), "quant.min_bits=2", "trainer.max_epochs=16"]),
    ("lig6_perbit_g0.01_min2_e16", "charge x6, min 2, over 16 epochs",
     [*per_bit("6", "0.01"), "quant.min_bits=2", "trainer.max_epochs=16"]),
    ("lig7_perbit_g0.01_min2_e16", "charge x7, min 2, over 16 epochs",
     [*per_bit("7", "0.01"), "quant.min_bits=2", "trainer.max_epochs=16"]),
    ("lig5_perbit_g0.01_min2_e16", "charge x5, min 2, over 16 epochs",
     [*per_bit("5", "0.01"), "quant.min_bits=2", "trainer.max_epochs=16"]),
    ("lig5_perbit_g0.01_min2_e16_seed1", "lig5_perbit_g0.01_min2_e16, seed 1 (the spread)",
     [*per_bit("5", "0.01"), "quant.min_bits=2", "trainer.max_epochs=16", "seed=1"]),
    ("float_e16_seed1", "float32, 16 epochs, seed 1", ["quant=none", "trainer.max_epochs=16", "seed=1"]),
    ("lig8.5_perbit_g0.01_min2_refit", "lig8.5_perbit_g0.01_min2, exponents refit to least "
     "squares at every surgery check", [*per_bit("8.5", "0.01"), "quant.min_bits=2",
                                        "quant.exponent_refit=true"]),
    ("lig5_perbit_g0.01_min2_e16_refit", "lig5_perbit_g0.01_min2_e16 (the default job), exponents "
     "refit", [*per_bit("5", "0.01"), "quant.min_bits=2", "trainer.max_epochs=16",
               "quant.exponent_refit=true"]),
    ("lig8.5_perbit_g0.01_min2_e16_refit", "lig8.5_perbit_g0.01_min2_e16, exponents refit",
     [*per_bit("8.5", "0.01"), "quant.min_bits=2", "trainer.max_epochs=16",
      "quant.exponent_refit=true"]),
    ("lig8_perbit_g0.01_min3_init6_refit", "lig8_perbit_g0.01_min3_init6, exponents refit",
     [*per_bit("8", "0.01"), "quant.min_bits=3", "quant.init_bits=6", "quant.exponent_refit=true"]),
    ("lig10_perbit_g0.01_min3_init6_refit", "lig10_perbit_g0.01_min3_init6, exponents refit",
     [*per_bit("10", "0.01"), "quant.min_bits=3", "quant.init_bits=6", "quant.exponent_refit=true"]),
    ("float_arch_lig10_min3_init6_refit", "float32 from scratch at the channels "
     "lig10_perbit_g0.01_min3_init6_refit ended with", ["quant=none", "+model.channels=[15,32,32,6]"]),
    ("w32_lig25_perbit_g0.01_min3_init6_refit", "width 32, charge x25, min 3 bits from 6, "
     "exponents refit", ["model.width=32", *per_bit("25", "0.01"), "quant.min_bits=3",
                         "quant.init_bits=6", "quant.exponent_refit=true"]),
    ("w32_lig18_perbit_g0.01_min3_init6_refit", "width 32, charge x18, min 3 bits from 6, "
     "exponents refit", ["model.width=32", *per_bit("18", "0.01"), "quant.min_bits=3",
                         "quant.init_bits=6", "quant.exponent_refit=true"]),
    ("lig1_perbit_cos0.3_lrq0.02_refit", "the kill-early recipe (lig1_perbit_cos0.3_lrq0.02), "
     "exponents refit", [*RECIPE, "quant.exponent_refit=true"]),
    ("lig1_perbit_cos0.3_lrq0.02_min2_refit", "the kill-early recipe, min 2 bits, exponents refit",
     [*RECIPE, "quant.min_bits=2", "quant.exponent_refit=true"]),
    ("lig1_perbit_cos0.3_lrq0.02_min3_init6_refit", "the kill-early recipe, min 3 bits from 6, "
     "exponents refit", [*RECIPE, "quant.min_bits=3", "quant.init_bits=6", "quant.exponent_refit=true"]),
    ("fixed2", "fixed-bit QAT, 2 bits (bench_pareto's fixed2)", ["quant=fixed", "quant.init_bits=2"]),
    ("fixed3", "fixed-bit QAT, 3 bits (bench_pareto's fixed3)", ["quant=fixed", "quant.init_bits=3"]),
    ("lig6_perbit_g0.01_min3_init6_refit", "charge x6, min 3 bits from 6, exponents refit",
     [*per_bit("6", "0.01"), "quant.min_bits=3", "quant.init_bits=6", "quant.exponent_refit=true"]),
    ("lig7_perbit_g0.01_min3_init6_refit", "charge x7, min 3 bits from 6, exponents refit",
     [*per_bit("7", "0.01"), "quant.min_bits=3", "quant.init_bits=6", "quant.exponent_refit=true"]),
    ("lig5_perbit_g0.01_min3_init6_e16_refit", "charge x5, min 3 bits from 6, exponents refit, "
     "16 epochs", [*per_bit("5", "0.01"), "quant.min_bits=3", "quant.init_bits=6",
                   "quant.exponent_refit=true", "trainer.max_epochs=16"]),
    ("lig6.5_perbit_g0.01_min3_init6_e16_refit", "charge x6.5, min 3 bits from 6, exponents refit, "
     "16 epochs", [*per_bit("6.5", "0.01"), "quant.min_bits=3", "quant.init_bits=6",
                   "quant.exponent_refit=true", "trainer.max_epochs=16"]),
    ("lig8_perbit_g0.01_min3_init6_e16_refit", "charge x8, min 3 bits from 6, exponents refit, "
     "16 epochs", [*per_bit("8", "0.01"), "quant.min_bits=3", "quant.init_bits=6",
                   "quant.exponent_refit=true", "trainer.max_epochs=16"]),
    ("w32_float", "float32, width 32", ["model.width=32", "quant=none"]),
    ("w32_lig1_perbit_cos0.3_lrq0.02_stop30", "width 32, the kill-early recipe, shrinking stopped "
     "at 30% of the weights", ["model.width=32", *RECIPE, "trainer.stop_shrinking_at=30"]),
    ("w32_float_arch_stop30", "float32, width 32, from scratch at the channels "
     "w32_lig1_perbit_cos0.3_lrq0.02_stop30 ended with", ["quant=none", "+model.channels=[18,47,29,31]"]),
    ("w32_lig1_perbit_cos0.3_lrq0.02_stop30_seed1", "w32_lig1_perbit_cos0.3_lrq0.02_stop30, seed 1",
     ["model.width=32", *RECIPE, "trainer.stop_shrinking_at=30", "seed=1"]),
    ("w32_lig1_perbit_cos0.3_lrq0.02_stop30_bits2", "w32_lig1_perbit_cos0.3_lrq0.02_stop30, survivors "
     "raised to 2 bits at the budget", ["model.width=32", *RECIPE, "trainer.stop_shrinking_at=30",
                                        "trainer.budget_bits=2"]),
    ("w32_lig1_perbit_cos0.3_lrq0.02_stop25_bits3", "the kill-early recipe at width 32, stopped at "
     "25%, survivors raised to 3 bits there", ["model.width=32", *RECIPE, "trainer.stop_shrinking_at=25",
                                               "trainer.budget_bits=3"]),
    ("w32_lig1_perbit_cos0.3_lrq0.02_stop30_bits2_check50", "w32_lig1_perbit_cos0.3_lrq0.02_stop30_bits2, "
     "surgery checks every 50 steps (not 200)", ["model.width=32", *RECIPE, "trainer.stop_shrinking_at=30",
                                                 "trainer.budget_bits=2", "trainer.prune_every=50"]),
    ("w32_float_arch_check50", "float32, width 32, from scratch at the channels "
     "w32_lig1_perbit_cos0.3_lrq0.02_stop30_bits2_check50 ended with",
     ["quant=none", "+model.channels=[20,52,37,30]"]),
    ("w32_lig1_perbit_cos0.3_lrq0.02_min2_stop30_check50", "the kill-early recipe at width 32, live "
     "channels held at 2 bits or more, stopped at 30% (checked every 50 steps)",
     ["model.width=32", *RECIPE, "quant.min_bits=2", "trainer.stop_shrinking_at=30",
      "trainer.prune_every=50"]),
    ("w32_lig1_perbit_cos0.3_lrq0.02_min3_stop30_check50", "the same, held at 3 bits or more",
     ["model.width=32", *RECIPE, "quant.min_bits=3", "trainer.stop_shrinking_at=30",
      "trainer.prune_every=50"]),
    ("w32_lig1_perbit_cos0.3_lrq0.02_min2_stop25_bits2_check10", "the kill-early recipe at width 32, "
     "live channels held at 2 bits or more, stopped at 25% (checked every 10 steps), every live b "
     "set to 2 or more there", ["model.width=32", *RECIPE, "quant.min_bits=2",
                                "trainer.stop_shrinking_at=25", "trainer.budget_bits=2",
                                "trainer.prune_every=10"]),
    ("w32_lig1_perbit_cos0.3_lrq0.02_min2_stop25_bits2_check10_seed1",
     "w32_lig1_perbit_cos0.3_lrq0.02_min2_stop25_bits2_check10, seed 1",
     ["model.width=32", *RECIPE, "quant.min_bits=2", "trainer.stop_shrinking_at=25",
      "trainer.budget_bits=2", "trainer.prune_every=10", "seed=1"]),
    ("w32_lig1_perbit_cos0.3_lrq0.02_min2_stop25_bits2_check50", "the kill-early recipe at width 32, "
     "live channels held at 2 bits or more, stopped at 25% (checked every 50 steps), every live b "
     "set to 2 or more there (+experiment=fashion_mnist_paper_regime)",
     ["model.width=32", *RECIPE, "quant.min_bits=2", "trainer.stop_shrinking_at=25",
      "trainer.budget_bits=2", "trainer.prune_every=50"]),
    ("w32_lig1_perbit_cos0.3_lrq0.02_min2_stop25_bits2_check50_seed1",
     "w32_lig1_perbit_cos0.3_lrq0.02_min2_stop25_bits2_check50, seed 1",
     ["model.width=32", *RECIPE, "quant.min_bits=2", "trainer.stop_shrinking_at=25",
      "trainer.budget_bits=2", "trainer.prune_every=50", "seed=1"]),
    ("w32_lig1_perbit_cos0.3_lrq0.02_min2_stop20_bits2_check50", "the benchmark's recipe "
     "(..._min2_stop25_bits2_check50) stopped at 20%",
     ["model.width=32", *RECIPE, "quant.min_bits=2", "trainer.stop_shrinking_at=20",
      "trainer.budget_bits=2", "trainer.prune_every=50"]),
    ("w32_float_seed1", "float32, width 32, seed 1", ["model.width=32", "quant=none", "seed=1"]),
    flops("4"),
    flops("2"),
    ("w32_float_arch_flops4", "float32, width 32, from scratch at the channels w32_paper_flops4 "
     "ended with", ["model.width=32", "quant=none", "+model.channels=[14,41,14,35]"]),
    flops("4", "_check10", "trainer.prune_every=10"),
    flops("4", "_seed1", "seed=1"),
    flops("4", "_check10_stop30", "trainer.prune_every=10", "trainer.stop_shrinking_at=30"),
    *[shape(c) for c in ([16, 48, 40, 32], [24, 48, 40, 32], [24, 40, 48, 32])],
    shape([24, 48, 40, 32], seed=1),
    flops("12", "_check10", "trainer.prune_every=10"),
    ("w32_paper_lig4_check10", "the paper regime's recipe, column charge x4, checked every 10 steps",
     merged(PAPER, ["quant.live_input_grad=4", "trainer.prune_every=10"])),
    ("w48_paper_stop30", "the paper regime's recipe at width 48, budget 30%",
     merged(PAPER48, ["trainer.stop_shrinking_at=30"])),
    ("w48_paper", "the paper regime's recipe at width 48 (the benchmark's run, trained again)",
     PAPER48),
    ("w48_paper_seed1", "the paper regime's recipe at width 48, seed 1", merged(PAPER48, ["seed=1"])),
    ("w48_float_seed1", "float32, width 48, seed 1", ["model.width=48", "quant=none", "seed=1"]),
    ("w48_float_arch", "float32 from scratch at the channels the width-48 recipe ended with",
     ["model.width=48", "quant=none", "+model.channels=[37,74,27,38]"]),
    ("w48_paper_uniform", "the width-48 recipe, every live channel priced the same",
     merged(PAPER48, ["quant.channel_price=uniform"])),
    ("w48_paper_uniform_hold", "the same, every bit depth held at the budget",
     merged(PAPER48, ["quant.channel_price=uniform", "trainer.hold_bits=true"])),
    ("w48_float_arch_uniform", "float32 from scratch at the channels the uniform price ended with",
     ["model.width=48", "quant=none", "+model.channels=[29,44,47,35]"]),
    ("w48_paper_uniform_bits4", "the width-48 recipe, a uniform price, survivors raised to 4 bits",
     merged(PAPER48, ["quant.channel_price=uniform", "trainer.budget_bits=4"])),
    ("w48_float", "float32, width 48 (the benchmark's float run, trained again)",
     ["model.width=48", "quant=none"]),
    ("w48_paper_uniform_stop30", "the width-48 recipe, a uniform price, budget 30%",
     merged(PAPER48, ["quant.channel_price=uniform", "trainer.stop_shrinking_at=30"])),
    ("w48_paper_hold", "the width-48 recipe, every bit depth held at the budget",
     merged(PAPER48, ["trainer.hold_bits=true"])),
    ("w32_lig3_perbit_g0.03", "width 32, per-bit charge x3, gamma 0.03",
     ["model.width=32", "quant.live_input_grad=3", "quant.live_input_spread=per_bit",
      "size_loss.gamma=0.03"]),
    ("w32_lig10_perbit_g0.03_freeze", "width 32, per-bit charge x10, gamma 0.03, frozen last quarter",
     ["model.width=32", "quant.live_input_grad=10", "quant.live_input_spread=per_bit",
      "size_loss.gamma=0.03", "trainer.freeze_quant=0.25"]),
]
# The seventh to ninth rounds' rows on CIFAR-10 (JPEG copy): +experiment=cifar10_resnet_cpu as it was
# then, plain self-compression (bench_cifar10.PLAIN), with each row's overrides on top
# (python experiments/channel_removal_study.py dataset.root=DIR --cifar10).
REMOVAL = ["quant=self_compress_removal", "size_loss.gamma=0.012"]


def refit(charge: int, min_bits: int = 3) -> list[str]:
    """The seventh round's recipe: the charge, live channels from 6 bits held at min_bits, refit."""
    return [*REMOVAL, f"quant.live_input_grad={charge}", f"quant.min_bits={min_bits}",
            "quant.init_bits=6", "quant.exponent_refit=true"]


CIFAR_ROWS = [
    ("float_w16", "float32, ResNet-9 width 16", ["quant=none"]),
    ("float_w11", "float32, width 11 (every layer narrower)", ["quant=none", "model.width=11"]),
    ("float_arch_h36", "float32, layer3's residual hidden width 36 of 128",
     ["quant=none", "+model.channels=[16,32,32,64,128,36]"]),
    ("sc", "self-compression, gamma 0.05 (the recipe's)", ["quant=self_compress"]),
    ("sc_refit", "sc, exponents refit", ["quant=self_compress", "quant.exponent_refit=true"]),
    ("lig10", "per-bit charge x10, gamma 0.012 (bench_cifar10's removal)",
     [*REMOVAL, "quant.live_input_grad=10"]),
    ("lig10_refit", "lig10, exponents refit", [*REMOVAL, "quant.live_input_grad=10",
                                                "quant.exponent_refit=true"]),
    ("lig20", "charge x20", [*REMOVAL, "quant.live_input_grad=20"]),
    ("lig15_min3_init6", "charge x15, live channels at >= 3 bits, from 6",
     [*REMOVAL, "quant.live_input_grad=15", "quant.min_bits=3", "quant.init_bits=6"]),
    ("lig15_min3_init6_refit", "lig15_min3_init6, exponents refit", refit(15)),
    ("lig10_min3_init6_refit", "charge x10, min 3 bits from 6, exponents refit", refit(10)),
    ("lig12_min3_init6_refit", "charge x12, min 3 bits from 6, exponents refit", refit(12)),
    ("float_w16_seed1", "float_w16, seed 1", ["quant=none", "seed=1"]),
    ("lig10_min3_init6_refit_seed1", "lig10_min3_init6_refit, seed 1", [*refit(10), "seed=1"]),
    ("lig10_min4_init6_refit", "charge x10, min 4 bits from 6, exponents refit", refit(10, min_bits=4)),
    ("lig10_min5_init6_refit", "charge x10, min 5 bits from 6, exponents refit", refit(10, min_bits=5)),
    ("float_w16_e15", "float32, 15 epochs", ["quant=none", "trainer.max_epochs=15"]),
    ("lig10_min3_init6_refit_e15", "lig10_min3_init6_refit, 15 epochs",
     [*refit(10), "trainer.max_epochs=15"]),
    ("float_arch_s80_h80", "float32, layer3's stream and residual hidden width 80 of 128",
     ["quant=none", "+model.channels=[16,32,32,64,80,80]"]),
    ("lig10_min3_init6_refit_cos0.02", "lig10_min3_init6_refit, gamma 0.02 early, cosine to 0",
     merged(refit(10), ["size_loss=cosine", "size_loss.gamma=0.02", "size_loss.warmup=0.2"])),
    ("lig6_min5_init6_refit", "charge x6, min 5 bits from 6, exponents refit", refit(6, min_bits=5)),
    ("lig10_min1_init6_refit", "charge x10, from 6 bits down to 1 (no floor), exponents refit",
     refit(10, min_bits=1)),
    ("lig7_min5_init6_refit", "charge x7, min 5 bits from 6, exponents refit", refit(7, min_bits=5)),
    ("lig7_min5_init6_refit_seed1", "lig7_min5_init6_refit, seed 1",
     [*refit(7, min_bits=5), "seed=1"]),
    ("lig8_min5_init6_refit", "charge x8, min 5 bits from 6, exponents refit", refit(8, min_bits=5)),
    ("lig7_min5_init6_refit_stop50", "lig7_min5_init6_refit, gamma 0 from <= 50% of the weights",
     [*refit(7, min_bits=5), "trainer.stop_shrinking_at=50"]),
    ("lig7_min5_init6_refit_stop50_seed1", "lig7_min5_init6_refit_stop50, seed 1",
     [*refit(7, min_bits=5), "trainer.stop_shrinking_at=50", "seed=1"]),
    ("float_w16_seed2", "float_w16, seed 2", ["quant=none", "seed=2"]),
    ("lig7_min5_init6_refit_stop50_seed2", "lig7_min5_init6_refit_stop50, seed 2",
     [*refit(7, min_bits=5), "trainer.stop_shrinking_at=50", "seed=2"]),
    ("lig10_min3_init6_refit_seed2", "lig10_min3_init6_refit, seed 2", [*refit(10), "seed=2"]),
]
KEYS = (*harness.SUMMARY_KEYS, "ideal_bytes", "flops", "flops_original", "channels_left")


def entropy_coded_bytes(run_dir: Path) -> int | None:
    """Bytes of the run's model.scn with an entropy-coded payload (format version 2)."""
    path = run_dir / "model.scn"
    if not path.exists():
        return None
    model, header = scn_format.load(path)
    return len(scn_format.to_bytes(model, header.get("dataset"), entropy_coded=True))


def main(argv: list[str] | None = None) -> None:
    def options(parser) -> None:
        parser.add_argument("--rows", nargs="*", default=None, help="rows to run (default: all)")
        parser.add_argument("--name", default="channel_removal", help="result file stem in --out")
        parser.add_argument("--cifar10", action="store_true",
                            help="the CIFAR-10 rows (pass dataset.root=DIR)")

    args = harness.arguments(__doc__, runs="outputs/study", argv=argv, add=options)
    rows = CIFAR_ROWS if args.cifar10 else ROWS
    unknown = sorted(set(args.rows or ()) - {name for name, _, _ in rows})
    if unknown:
        raise SystemExit(f"channel_removal_study: no {'CIFAR-10 ' if args.cifar10 else ''}row named "
                         f"{', '.join(unknown)}. Nothing was run. The rows are the names in "
                         f"{'CIFAR_ROWS' if args.cifar10 else 'ROWS'} of this script.")
    results = []
    for name, lever, overrides in rows:
        if args.rows is not None and name not in args.rows:
            continue
        if args.cifar10:
            ov = ["+experiment=cifar10_resnet_cpu", *merged(bench_cifar10.PLAIN, overrides, args.overrides)]
        else:
            plain = "quant=none" in overrides or "quant=fixed" in overrides  # no charge to set
            before = [o for o in BEFORE if not (o.startswith("quant.") and plain)]
            ov = ["+experiment=fashion_mnist_bench", *merged(before, overrides, args.overrides)]
        summary = run_overrides(ov, args.runs / name)
        results.append(harness.row(name, summary, KEYS, lever=lever, overrides=" ".join(overrides),
                                   entropy_file_bytes=entropy_coded_bytes(args.runs / name)))
    path = harness.write(args, __file__, args.name, results)
    print("| row | lever | accuracy | bits/weight | weights left | FLOPs left | wall time |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        flops = f"{100 * r['flops'] / r['flops_original']:.1f}%"
        print(f"| `{r['method']}` | {r['lever']} | {r['test_accuracy']:.2f}% | "
              f"{r['bits_per_weight']:.3f} | {r['weights_left_pct']:.1f}% | {flops} | "
              f"{r['wall_time_s']:.0f} s |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:] if len(sys.argv) > 1 else None)
