"""The optimizer and its schedules: AdamW for the weights, b and e in a group of their own.

Every group's learning rate warms up linearly and decays along a cosine to zero; the bit
depths and exponents can also be frozen (lr 0) for the last fraction of training
(`trainer.freeze_quant`), so the weights fine-tune on one bit allocation as the lr decays.
docs/design.md says why.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from scn.quant import quant_parameters, weight_parameters


def make_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW for the weights; b and e in their own group: their own lr, no weight decay.

    `cfg` is a scn.train.TrainConfig (its lr, lr_quant and weight_decay). The b and e group
    runs fused (one kernel for every small per-channel tensor, where the default would issue a
    dozen operations per tensor); its updates equal the default implementation's bit for bit.
    """
    groups = [{"params": weight_parameters(model), "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    quant = quant_parameters(model)
    if quant:
        groups.append({"params": quant, "lr": cfg.lr_quant, "weight_decay": 0.0, "fused": True})
    return torch.optim.AdamW(groups)


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up then cosine decay to zero, as a multiplier of each group's lr."""
    ramp = warmup * total
    if step < ramp:
        return (step + 1) / ramp
    return 0.5 * (1 + math.cos(math.pi * min((step - ramp) / max(total - ramp, 1), 1.0)))


def freeze_step(total: int, freeze_quant: float) -> int:
    """The first step at which bit depths and exponents get learning rate 0 (`total` if never)."""
    return total - round(freeze_quant * total)


def lr_lambdas(optimizer: torch.optim.Optimizer, model: nn.Module, total: int,
               cfg) -> list[Callable[[int], float]]:
    """One lr multiplier per parameter group: warm-up and cosine decay for every group, and
    zero for the bit depths and exponents from `freeze_step(total, cfg.freeze_quant)` on."""
    freeze_at = freeze_step(total, cfg.freeze_quant)

    def weights(step: int) -> float:
        return lr_factor(step, total, cfg.warmup)

    def quant(step: int) -> float:
        return weights(step) if step < freeze_at else 0.0

    quant_ids = {id(p) for p in quant_parameters(model)}
    return [quant if any(id(p) in quant_ids for p in g["params"]) else weights
            for g in optimizer.param_groups]


def scheduler(optimizer: torch.optim.Optimizer, model: nn.Module, total: int,
              cfg) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambdas(optimizer, model, total, cfg))
