"""Evaluation: test accuracy, and BatchNorm statistics re-estimated before it.

Used by the training loop (every evaluation, and before the model is saved) and by scn-eval,
so a decoded file is measured with the same arithmetic its run reported.
"""

from __future__ import annotations

import itertools
from contextlib import nullcontext

import torch
from torch import nn

from scn.data import ImageData, batches
from scn.quant import frozen


def bf16_autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when `amp`; a no-op elsewhere (the CPU always runs float32)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageData, batch_size: int = 1000,
             channels_last: bool = False, amp: bool = False) -> tuple[float, torch.Tensor]:
    """Test accuracy in percent, and every test prediction (for exact comparisons)."""
    was_training = model.training
    model.eval()
    preds = []
    with frozen(model), bf16_autocast(data.test_x.device, amp):
        for xb, _ in batches(data, "test", batch_size, channels_last=channels_last):
            preds.append(model(xb).argmax(1))
    model.train(was_training)
    pred = torch.cat(preds)
    return 100.0 * float((pred == data.test_y).float().mean()), pred.cpu()


def _norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_norms(model: nn.Module, data: ImageData, num_batches: int, batch_size: int = 256,
                      channels_last: bool = False, amp: bool = False, seed: int = 0) -> int:
    """Replace every BatchNorm's running statistics by their average over `num_batches`.

    A self-compressing network changes in jumps (a rounded b or e crossing a half-integer), so
    running averages describe a mixture of recent networks; docs/design.md says what that cost.
    The batches come from a generator of their own (`seed`): the run's batch order is untouched
    and a resumed run recalibrates identically. Returns the number of BatchNorm layers recalibrated.
    """
    norms = _norms(model)
    if not norms or num_batches <= 0:
        return 0
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    model.train()
    generator = torch.Generator().manual_seed(seed)
    try:
        with frozen(model), bf16_autocast(data.train_x.device, amp):
            for xb, _ in itertools.islice(batches(data, "train", batch_size, generator, channels_last),
                                          num_batches):
                model(xb)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return len(norms)


@torch.no_grad()
def flops(model: nn.Module, example: torch.Tensor) -> int:
    """Forward FLOPs of one image through `model` as it is now (torch.utils.flop_counter:
    convolutions and matrix products; a removed channel's work is gone, a masked one's is not)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, frozen(model):
        model(example[:1])
    model.train(was_training)
    return int(counter.get_total_flops())
