"""How many ATen operations one training step dispatches: float against self-compression.

On a GPU each operation is at least one kernel launch, so a step of a small network is bound by
this count rather than by FLOPs. Counted on the CPU (no GPU needed): the optimizer there runs
per tensor, so a GPU step (foreach optimizer) dispatches somewhat fewer; the difference between
the two methods is the quantizer and the size term.

    python experiments/count_step_ops.py                 # ResNet-9, as in docs/results.md
    python experiments/count_step_ops.py --model SmallCNN --in-channels 1 --image-size 28
"""

from __future__ import annotations

import argparse
import collections

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from scn import size
from scn.methods import Scheme, quantize_
from scn.models import build
from scn.optim import make_optimizer
from scn.train import TrainConfig


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def step_ops(kind: str, model_name: str, in_channels: int, image_size: int) -> collections.Counter:
    """Operations of one full step (forward, size term, backward, optimizer), after a warm-up step."""
    model = build(model_name, in_channels=in_channels, num_classes=10, width=8, image_size=image_size)
    model = quantize_(model, Scheme(kind=kind, init_bits=3))
    optimizer = make_optimizer(model, TrainConfig())
    learn_bits = kind == "self_compress"
    fixed = size.fixed_bits(model) if learn_bits else None
    x, y = torch.randn(2, in_channels, image_size, image_size), torch.tensor([1, 2])

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        if learn_bits:
            loss = loss + 0.1 * size.size_loss(model, fixed)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # optimizer state is created on the first step
    with CountOps() as counter:
        step()
    return counter.counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ResNet9")
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args(argv)
    for kind in ("none", "self_compress"):
        counts = step_ops(kind, args.model, args.in_channels, args.image_size)
        top = ", ".join(f"{op} {n}" for op, n in counts.most_common(6))
        print(f"{kind:>13}: {sum(counts.values())} operations per step ({top}, ...)")


if __name__ == "__main__":
    main()
