"""Divergence checks: a NaN or Inf stops a run with the step and its likely cause."""

from __future__ import annotations

import torch
from torch import nn

from scn.errors import NumericalError


def check_finite(step: int, loss: torch.Tensor, model: nn.Module, gamma: float) -> None:
    """Stop with a NumericalError naming the step when the loss or a parameter is NaN or Inf.

    Parameters include every layer's bit depths b and exponents e, so a diverging b/e learning
    rate is caught as early as one of the weights.
    """
    if torch.isfinite(loss):
        bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
        if not bad:
            return
        where = f"parameters {', '.join(bad[:4])}" + (" and more" if len(bad) > 4 else "")
        if all(n.endswith((".b", ".e")) for n in bad):
            where += " (bit depths b / exponents e: most likely trainer.lr_quant is too high)"
    else:
        where = "the loss"
    raise NumericalError(
        f"training diverged at step {step}: {where} became NaN or Inf (gamma={gamma:g}). "
        "The usual causes are a learning rate too high for the weights (trainer.lr) or for the "
        "bit depths and exponents (trainer.lr_quant), or a size-loss weight so large that "
        "every channel collapses (size_loss.gamma). Lower the one you last raised and rerun."
    )
