"""The live-input charge: what a channel keeps alive in the layers that read it.

In the size term a layer costs `I_l * kernel * sum_i b_li`, where `I_l` counts its live input
channels. `I_l` depends on the producers' bit depths (an input dies with the channel that feeds
it), but as a count it has no gradient: a channel's b then feels only its own weights, never the
input columns it keeps alive downstream, which in a small CNN's classifier cost more than the
channel itself. A straight-through derivative of the count (d[b > 0]/db = 1 on a live channel)
charges a channel that column too: d Q / d b_j gains, per space the channel produces,

    sum over consumers c of  block_c * kernel_c * sum_i B_ci   (divided among its live producers)

where B_ci are the consumer's stored bit depths. Q's value does not change (the counts are
exact); only its gradient does, scaled by `weight` (`quant.live_input_grad`; 0 = the count is a
constant, scn's original term).

How the charge is spread over a channel's bits (`quant.live_input_spread`): "flat" charges the
whole column for every bit (d[b > 0]/db = 1); "per_bit" charges column / B, the column's cost
per bit the channel holds, so the pull grows as B falls: a channel at 1 bit feels the whole
column, one at 4 bits a quarter of it. The column is a fixed cost of being alive, which makes a
channel's cost concave in its bits, and per_bit is what lets that concavity show.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from scn.graph import ChannelGraph
from scn.quant import SCLayer


@dataclass
class Columns:
    """Per step, `factor(stored)` gives each trainable channel its columns' bits per unit b."""

    consumers: torch.Tensor  # (spaces, channels): block x kernel where a channel consumes the space
    fixed: torch.Tensor  # (spaces,): column bits of the consumers whose b does not train
    share: torch.Tensor  # (channels, spaces): weight / live producers where a channel produces it
    per_bit: bool = False  # spread: the column divided by the channel's own bits

    def factor(self, stored: torch.Tensor) -> torch.Tensor:
        """The columns each channel keeps alive, from every channel's stored bit depth now."""
        stored = stored.to(self.consumers.dtype)
        column = self.share @ (self.consumers @ stored + self.fixed)
        return column / stored.clamp(min=1) if self.per_bit else column


SPREADS = ("flat", "per_bit")


def columns(model: nn.Module, graph: ChannelGraph, layers: list[SCLayer],
            weight: float, spread: str = "flat", charges: dict[str, float] | None = None
            ) -> Columns | None:
    """The charge for the channels of `layers` (the size plan's, in its order); None when off.
    `charges` (scn.flops_charge) weighs each consumer's column by its uses per example."""
    if not weight or not layers:
        return None
    names = {id(m): name for name, m in model.named_modules()}
    offsets, start = {}, 0
    for m in layers:
        offsets[names[id(m)]] = start
        start += m.weight.shape[0]
    spaces = [s for s in graph.spaces if s.consumers and s.producers]
    dtype, device = layers[0].b.dtype, layers[0].b.device
    consumers = torch.zeros(len(spaces), start, dtype=dtype, device=device)
    fixed = torch.zeros(len(spaces), dtype=dtype, device=device)
    share = torch.zeros(start, len(spaces), dtype=dtype, device=device)
    for s, space in enumerate(spaces):
        for name, block, _ in space.consumers:
            layer = model.get_submodule(name)
            weights_per_channel = block * layer.kernel_numel()  # of each output, per input channel
            weights_per_channel *= (charges or {}).get(name, 1.0)
            if name in offsets:
                consumers[s, offsets[name]:offsets[name] + layer.weight.shape[0]] = weights_per_channel
            else:  # a float or fixed-bit consumer: its column's bits change only at surgery
                fixed[s] += weights_per_channel * layer.int_bits().sum().to(dtype)
        live = [model.get_submodule(p).live_out() for p in space.producers]
        count = torch.stack(live).sum(0).clamp(min=1).to(dtype)
        for name, alive in zip(space.producers, live, strict=True):
            if name in offsets:
                rows = slice(offsets[name], offsets[name] + alive.shape[0])
                share[rows, s] = weight * alive.to(dtype) / count
    return Columns(consumers, fixed, share, per_bit=spread == "per_bit")
