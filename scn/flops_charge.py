"""The FLOPs charge: the size term's gradient weighs a weight by how often an image uses it.

Q counts bits, so a weight of the classifier and one of a full-resolution convolution cost the
same, although the convolution applies its weight at every output position (784 on a 28x28
image) and the classifier once. Training time follows those uses: a network shrunk by Q alone
keeps its costly early channels, which hold few weights (docs/study/channel_removal.md,
eleventh round). With `quant.flops_charge=λ` the gradient of Q for a channel of layer l, its own
weights and the input columns it keeps alive downstream (scn.columns), is scaled by

    1 + λ · P_l / P_max

where P_l is the layer's output positions per example and P_max the largest layer's: the
gradient of Q plus λ times the bit-operations per example over P_max, through the same
straight-through estimators. Q's value stays the file's bits per weight.
"""

from __future__ import annotations

import torch
from torch import nn

from scn.graph import ChannelGraph


def layer_charges(graph: ChannelGraph, strength: float) -> dict[str, float]:
    """Per converted layer: 1 + strength x its output positions / the largest layer's."""
    top = max(graph.positions.values(), default=1)
    return {name: 1.0 + strength * p / top for name, p in graph.positions.items()}


def per_channel(model: nn.Module, layers: list[nn.Module], charges: dict[str, float],
                like: torch.Tensor) -> torch.Tensor:
    """The charge of every output channel of `layers`, concatenated in their order."""
    names = {id(m): name for name, m in model.named_modules()}
    return torch.cat([torch.full((m.weight.shape[0],), charges.get(names[id(m)], 1.0),
                                 dtype=like.dtype, device=like.device) for m in layers])
