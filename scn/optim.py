"""The optimizer and its schedules: AdamW for the weights, b and e in a group of their own.

Every group's learning rate warms up linearly and decays along a cosine to zero (the bit
depths' and exponents' can instead stay at `lr_quant` after the warm-up:
`trainer.quant_lr_schedule=constant`); they can also be frozen (lr 0) for the last fraction of
training (`trainer.freeze_quant`), so the weights fine-tune on one bit allocation.
`load_state` puts a training checkpoint's optimizer state back, by parameter name.
docs/design.md says why.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from scn.errors import ConfigError
from scn.quant import quant_parameters, sc_layers, weight_parameters


def make_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW for the weights; b and e in their own group: their own lr, no weight decay.

    `cfg` is a scn.train.TrainConfig (its lr, lr_quant and weight_decay). The b and e group is
    updated with foreach operations (`AdamW` below), bit for bit as torch's default would.
    """
    groups = [{"params": weight_parameters(model), "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    quant = quant_parameters(model)
    if quant:
        groups.append({"params": quant, "lr": cfg.lr_quant, "weight_decay": 0.0, "shared_step": True})
    return AdamW(groups)


class AdamW(torch.optim.AdamW):
    """torch's AdamW, except for groups marked `shared_step`: their parameters (many small
    per-channel tensors, all stepped together) are updated with one foreach operation per line
    of the algorithm for the whole group, where torch's CPU default issues a dozen operations per
    tensor and its fused kernel rounds differently. Same arithmetic in the same order as torch's
    single-tensor AdamW, so the same bits; the state (step, exp_avg, exp_avg_sq per parameter)
    is torch's, so surgery, checkpoints and resume treat it alike."""

    @torch.no_grad()
    def step(self, closure=None):
        groups = self.param_groups
        shared = [g for g in groups if g.get("shared_step")]
        self.param_groups = [g for g in groups if not g.get("shared_step")]
        try:
            loss = super().step(closure)
        finally:
            self.param_groups = groups
        for group in shared:
            self._shared_step(group)
        return loss

    def _shared_step(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            state = self.state[p]
            if not state:  # as torch.optim.AdamW initialises it
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states = [self.state[p] for p in params]
        step = self._count(group, [st["step"] for st in states])
        beta1, beta2 = group["betas"]
        lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
        grads = [p.grad for p in params]
        exp_avgs, exp_avg_sqs = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
        if decay != 0:
            torch._foreach_mul_(params, 1 - lr * decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        step_size = lr / (1 - beta1**step)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, (1 - beta2**step) ** 0.5)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, value=-step_size)

    @staticmethod
    def _count(group: dict, steps: list[torch.Tensor]) -> float:
        """The group's new step count. It lives in the group (`shared_count`: saved, loaded and
        copied with it) and is written into the state's `step` tensors only when the state is
        read (`sync_steps`), not each step: one operation fewer, and no device sync on a GPU.
        Without it (a new optimizer, a state loaded by hand) it is read from the state."""
        count = group.get("shared_count")
        if count is None:
            count = float(steps[0])
            if any(float(s) != count for s in steps):
                raise RuntimeError("scn.optim.AdamW: a shared_step group's parameters have "
                                   "different step counts")
        group["shared_count"] = count + 1
        return count + 1

    def sync_steps(self) -> None:
        """Write the shared step counts into the state (before anything reads or saves it)."""
        for group in self.param_groups:
            if group.get("shared_step") and group.get("shared_count") is not None:
                for p in group["params"]:
                    if "step" in self.state.get(p, {}):
                        self.state[p]["step"].fill_(group["shared_count"])

    def state_dict(self) -> dict:
        self.sync_steps()
        return super().state_dict()


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
        if step >= freeze_at:
            return 0.0
        if cfg.quant_lr_schedule == "constant" and step >= cfg.warmup * total:
            return 1.0
        return weights(step)

    quant_ids = {id(p) for p in quant_parameters(model)}
    return [quant if any(id(p) in quant_ids for p in g["params"]) else weights
            for g in optimizer.param_groups]


def scheduler(optimizer: torch.optim.Optimizer, model: nn.Module, total: int,
              cfg) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambdas(optimizer, model, total, cfg))


def settle_at_budget(optimizer: torch.optim.Optimizer, model: nn.Module, bits: int = 0) -> None:
    """At the size budget (trainer.stop_shrinking_at), where gamma drops to 0: zero Adam's first
    moment of every bit depth (those without state have none to forget), and with `bits` > 0
    raise the survivors below it (SCLayer.refine_bits)."""
    for _, layer in sc_layers(model):
        if "exp_avg" in optimizer.state.get(layer.b, {}):
            optimizer.state[layer.b]["exp_avg"].zero_()
        if bits:
            layer.refine_bits(bits)


def drop_bit_grads(model: nn.Module) -> None:
    """Hold every bit depth (trainer.hold_bits): without a gradient AdamW leaves b and its
    state as they are, while the exponents in the same group go on learning."""
    for _, layer in sc_layers(model):
        layer.b.grad = None


def load_state(opt: torch.optim.Optimizer, model: nn.Module, t: dict[str, torch.Tensor]) -> None:
    """AdamW's per-parameter state from a training state's `optim/<parameter>/<slot>` tensors,
    matched to the parameters by name (so it maps onto a rebuilt, shrunk model)."""
    params = dict(model.named_parameters())
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    opt.state.clear()
    for group in opt.param_groups:  # scn.optim.AdamW: counted from the restored state again
        group.pop("shared_count", None)
    for key, value in t.items():
        if not key.startswith("optim/"):
            continue
        name, _, slot = key.removeprefix("optim/").rpartition("/")
        p = params.get(name)
        if p is None or id(p) not in group_of:
            raise ConfigError(f"the training state holds optimizer state for {name!r}, "
                              "which this model does not train.")
        group = group_of[id(p)]
        if slot == "step":  # a count: on the CPU, or with the parameter when fused
            on_device = group.get("capturable") or group.get("fused")
            opt.state[p][slot] = value.to(p.device) if on_device else value
            continue
        if value.shape != p.shape:
            raise ConfigError(f"the training state's {key} has shape {list(value.shape)} "
                              f"but the parameter has {list(p.shape)}.")
        opt.state[p][slot] = value.to(p.device)
