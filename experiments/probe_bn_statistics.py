"""Is a mid-run test accuracy the network's, or its stale BatchNorm averages'?

Trains the removal benchmark's old, chaotic recipe (small CNN width 24, gamma=0.5,
trainer.lr_quant=0.01) with evaluation on the running averages (trainer.recalibrate_bn=0), and
at every evaluation also measures the same weights (a) after re-estimating the statistics on 20
training batches of 256 and (b) with batch statistics (train-mode BatchNorm, 500 test images per
batch). Prints one JSON line per evaluation; stops after --steps.

    python experiments/probe_bn_statistics.py --steps 1521 > docs/results/bn_statistics_probe.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from scn.cli import build_experiment
from scn.data import batches
from scn.evaluation import evaluate, recalibrate_norms
from scn.quant import frozen
from scn.sweep import compose_config
from scn.train import Reporter, Trainer, learns_bits

RECIPE = ["+experiment=fashion_mnist_bench", "model.width=24", "size_loss.gamma=0.5",
          "trainer.lr_quant=0.01", "trainer.recalibrate_bn=0", "trainer.progress=false"]


class _Enough(Exception):
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=1521)
    parser.add_argument("--eval-every", type=int, default=117)
    args = parser.parse_intermixed_args()
    exp = build_experiment(compose_config([*RECIPE, f"trainer.eval_every={args.eval_every}",
                                           *args.overrides]))
    model = exp.build_model()
    trainer = Trainer(model, exp.data, exp.trainer, exp.schedule, learns_bits(model), exp.seed)
    layout = trainer.channels_last

    def recalibrated() -> float:
        m = copy.deepcopy(model)
        recalibrate_norms(m, exp.data, 20, channels_last=layout, seed=123)
        return evaluate(m, exp.data, channels_last=layout)[0]

    @torch.no_grad()
    def batch_statistics() -> float:
        m = copy.deepcopy(model).train()
        with frozen(m):
            hits = sum(int((m(x).argmax(1) == y).sum())
                       for x, y in batches(exp.data, "test", 500, channels_last=layout))
        return 100 * hits / len(exp.data.test_y)

    class Probe(Reporter):
        def evaluated(self, row: dict) -> None:
            print(json.dumps({"step": row["step"], "running_averages": round(row["test_accuracy"], 2),
                              "recalibrated": round(recalibrated(), 2),
                              "batch_statistics": round(batch_statistics(), 2),
                              "bits_per_weight": round(row["bits_per_weight"], 3),
                              "param_count": row["param_count"]}), flush=True)
            if row["step"] >= args.steps:
                raise _Enough

    try:
        trainer.run(Probe())
    except _Enough:
        pass


if __name__ == "__main__":
    main()
