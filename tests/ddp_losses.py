"""Trains a small SmallCNN in float64 with surgery and writes its per-step losses to argv[1]:
run as one process and under `torchrun --nproc_per_node=2` by tests/test_distributed.py."""

import json
import sys

import torch

torch.set_default_dtype(torch.float64)

from scn import distributed  # noqa: E402
from scn.data import synthetic  # noqa: E402
from scn.methods import SelfCompress, quantize_  # noqa: E402
from scn.models import build  # noqa: E402
from scn.schedule import Constant  # noqa: E402
from scn.train import Reporter, TrainConfig, Trainer, learns_bits  # noqa: E402


class Rows(Reporter):
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def logged(self, rows: list[dict]) -> None:
        self.rows.extend(rows)


group = distributed.start("cpu")
data = synthetic(num_train=256, num_test=64)
torch.manual_seed(0)
model = quantize_(build("SmallCNN", in_channels=1, num_classes=4, width=4), SelfCompress(init_bits=2))
cfg = TrainConfig(max_steps=16, batch_size=32, prune_every=4, lr_quant=0.3, device="cpu",
                  progress=False, sync_norms=True, eval_every=4)
trainer = Trainer(model, data, cfg, Constant(gamma=3.0), learns_bits(model), seed=0)
reporter = Rows()
result = trainer.run(reporter)
if group is None or group.main:
    with open(sys.argv[1], "w") as f:
        json.dump({"loss": [r["loss"] for r in reporter.rows], "surgeries": result.surgeries,
                   "accuracy": [r["test_accuracy"] for r in result.history],
                   "params": sum(p.numel() for p in model.parameters())}, f)
distributed.stop()
