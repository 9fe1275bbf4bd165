"""Size accounting: what a model costs in bits, counted the way the file stores it.

One rule for everything, applied to the model's state as it is now:

- a quantized layer's weights cost `live_inputs * kernel_size * sum_i B_i` bits, where `B_i` is
  the integer bit depth of output channel i (0 for a dead channel) and only inputs still fed by
  a live producer count (`in_alive`);
- each quantized output channel also stores its bit depth and exponent, one byte each;
- every other tensor (biases, norm layers, running statistics, float layers, folded offsets)
  costs its real width (32 bits for float32) per element, dead inputs of float layers excluded;
- `in_alive` masks and BatchNorm's `num_batches_tracked` are not stored (inference needs them
  not), so they cost nothing.

"Bits per weight" divides that total by the number of scalars in the original float model
(parameters plus float buffers), so a float32 model is exactly 32.0 and every method is
compared against the same denominator, before and after channels are removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from scn.columns import Columns
from scn.quant import MAX_BITS, SCLayer, raise_live_bits, sc_layers
from scn.reference import FREE_SUFFIXES as _FREE_SUFFIXES
from scn.reference import Reference, reference_of  # noqa: F401 (re-exported)

META_BITS_PER_CHANNEL = 16  # one byte for the bit depth, one for the exponent


def _live_inputs(layer: SCLayer) -> torch.Tensor:
    return layer.in_alive.sum()


def weight_bits(layer: SCLayer, bits: torch.Tensor | None = None) -> torch.Tensor:
    """Bits of one layer's weights: live inputs x kernel x sum of per-channel bit depths."""
    if bits is None:
        bits = layer.int_bits()
    per_input = layer.kernel_numel() * bits.sum()
    return _live_inputs(layer) * per_input


def _stored_bits(model: nn.Module):
    """Yield (kind, bits) for every tensor the file stores: kind is "weight" (quantized
    weights), "qat_weight" (quantized weights with a fixed b), "meta" (bit depths and
    exponents) or "float" (everything else, at its real width)."""
    owners = {f"{name}.{attr}" if name else attr: layer
              for name, layer in sc_layers(model) for attr in ("weight", "b", "e")}
    for key, tensor in model.state_dict().items():
        if key.endswith(_FREE_SUFFIXES):
            continue
        layer = owners.get(key)
        attr = key.rpartition(".")[2]
        if layer is None:
            yield "float", tensor.numel() * tensor.element_size() * 8
        elif not layer.quantized:
            if attr == "weight":  # a float layer: dead inputs are not stored
                yield "float", int(weight_bits(layer))
        elif attr == "weight":
            yield ("weight" if layer.b.requires_grad else "qat_weight"), int(weight_bits(layer))
        elif attr == "b":
            yield "meta", tensor.numel() * META_BITS_PER_CHANNEL


def fixed_bits(model: nn.Module) -> torch.Tensor:
    """Bits the optimizer cannot change through a trainable b: floats, per-channel meta, and
    the weights of quantized layers whose b is fixed (the QAT baseline).

    Constant between channel surgeries, so the training loop computes it once per surgery.
    """
    total = sum(bits for kind, bits in _stored_bits(model) if kind != "weight")
    return torch.tensor(float(total), dtype=torch.float64)


@dataclass
class SizePlan:
    """What Q needs that changes only at surgery: the trainable bit depths and their weights."""

    layers: list[SCLayer]  # quantized layers whose b trains
    weight: torch.Tensor  # per output channel: live inputs x kernel size (float64, exact)
    weight_b: torch.Tensor  # the gradient's factor: the same in b's dtype, times any FLOPs charge
    round_bits: bool
    scalars: int
    columns: Columns | None = None  # the live-input charge (scn.columns), None when off
    min_bits: int = 1  # the fewest bits a live channel is stored with
    uniform_price: bool = False  # quant.channel_price=uniform: every live channel the mean pull


def size_plan(model: nn.Module) -> SizePlan | None:
    """The plan of `size_loss`; None when no layer's b trains."""
    layers = [m for _, m in sc_layers(model) if m.quantized and m.b.requires_grad]
    if not layers:
        return None
    per_channel = torch.cat([(_live_inputs(m) * m.kernel_numel()).expand(m.b.shape[0]).double()
                             for m in layers])
    return SizePlan(layers, per_channel, per_channel.to(layers[0].b.dtype), layers[0].round_bits,
                    reference_of(model).scalars, min_bits=layers[0].min_bits)


@dataclass
class SizeInputs:
    """Q's constants between surgeries, in the dtype its integer total is summed in."""

    weight: torch.Tensor  # live inputs x kernel per channel
    weight_b: torch.Tensor  # the gradient's factor (SizePlan.weight_b)
    fixed: torch.Tensor  # bits no trainable b changes
    scalars: int
    columns: Columns | None = None
    uniform_price: bool = False

    def gradient_factor(self, stored: torch.Tensor) -> torch.Tensor:
        """dQ/db per channel, times the number of scalars: its own weights (and, with the
        live-input charge, the input columns it keeps alive); with a uniform price, the mean of
        that over the live channels, for every channel."""
        factor = self.weight_b if self.columns is None else self.weight_b + self.columns.factor(stored)
        if not self.uniform_price:
            return factor
        live = (stored > 0).to(factor.dtype)
        mean = (factor * live).sum() / live.sum().clamp(min=1)
        return mean.expand_as(factor)


def q_of_stored(stored: torch.Tensor, inputs: SizeInputs, dtype: torch.dtype) -> torch.Tensor:
    """Q from every channel's stored bit depth (clamped to 0..16): integers summed exactly in
    the inputs' dtype, in any order, so Q equals the per-layer sum."""
    total = torch.dot(stored.to(inputs.weight.dtype), inputs.weight) + inputs.fixed
    return total.to(dtype) / inputs.scalars


class _SizeLoss(torch.autograd.Function):
    """(plan, fixed, *bit depths) -> Q, with the straight-through gradient of stored bits."""

    @staticmethod
    def forward(ctx, plan: SizePlan, fixed: torch.Tensor, *bits: torch.Tensor) -> torch.Tensor:
        b = torch.cat(bits)
        # what the file stores
        stored = raise_live_bits(b.round(), plan.min_bits) if plan.round_bits else b.ceil()
        clamped = stored.clamp(0, MAX_BITS)
        ctx.inside = (stored > 0) & (stored < MAX_BITS)  # where the clamp passes a gradient
        ctx.plan = plan
        inputs = SizeInputs(plan.weight, plan.weight_b, fixed.to(b.device, torch.float64), plan.scalars,
                            plan.columns, plan.uniform_price)
        ctx.factor = inputs.gradient_factor(clamped)
        return q_of_stored(clamped, inputs, b.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        plan = ctx.plan
        g = torch.where(ctx.inside, (grad / plan.scalars) * ctx.factor, 0.0)
        return (None, None, *g.split([m.b.shape[0] for m in plan.layers]))


def fused_inputs(plan: SizePlan, fixed: torch.Tensor) -> SizeInputs:
    """Q's part of scn.fused's function: summed in b's dtype where every possible total is an
    exact integer there (as the per-layer sum is), else in float64."""
    dtype = plan.weight_b.dtype
    limit = 2.0 ** (24 if dtype == torch.float32 else 53)  # integers exact below this
    exact = float(plan.weight.sum()) * MAX_BITS + float(fixed) <= limit
    dtype = dtype if exact else torch.float64
    return SizeInputs(plan.weight.to(dtype), plan.weight_b, fixed.to(dtype), plan.scalars,
                      plan.columns, plan.uniform_price)


def size_loss(model: nn.Module, fixed: torch.Tensor | None = None,
              plan: SizePlan | None = None) -> torch.Tensor:
    """Q: the model's bits per original scalar, differentiable in every trainable b.

    Uses the integer bit depths the file stores (rounded with a straight-through estimator,
    so the gradient reaches the real b), hence Q equals `report(model).bits_per_weight`.
    `fixed` is `fixed_bits(model)` and `plan` is `size_plan(model)`, passed in by callers that
    cache them between surgeries. Every layer's bit depths enter one function, a few operations
    for the whole network.
    """
    ref = reference_of(model)
    fixed = fixed_bits(model) if fixed is None else fixed
    plan = size_plan(model) if plan is None else plan
    if plan is None:
        return fixed.float() / ref.scalars
    return _SizeLoss.apply(plan, fixed, *(m.b for m in plan.layers))


@dataclass
class SizeReport:
    weight_bits: int  # quantized weights' payload
    float_bits: int  # float tensors at their width
    meta_bits: int  # per-channel bit depths and exponents
    reference_scalars: int
    weights_stored: int  # weight elements still stored (live out x live in x kernel)
    reference_weights: int
    param_count: int  # nn.Parameter elements now, b and e excluded
    channels: dict[str, tuple[int, int]]  # layer -> (live output channels, original)
    dead_channels: int = 0  # output channels at 0 bits still in the network (not removed)

    @property
    def total_bits(self) -> int:
        return self.weight_bits + self.float_bits + self.meta_bits

    @property
    def bits_per_weight(self) -> float:
        return self.total_bits / self.reference_scalars

    @property
    def float_bits_pct(self) -> float:
        return 100.0 * self.total_bits / (32 * self.reference_scalars)

    @property
    def weights_left_pct(self) -> float:
        return 100.0 * self.weights_stored / self.reference_weights

    @property
    def ideal_bytes(self) -> float:
        """Everything counted, packed with no overhead: total bits / 8."""
        return self.total_bits / 8

    @property
    def payload_ideal_bytes(self) -> float:
        """Quantized weights alone, packed with no overhead."""
        return self.weight_bits / 8

    @property
    def float32_bytes(self) -> int:
        """The original model stored as float32."""
        return 4 * self.reference_scalars

    def as_dict(self) -> dict:
        return {
            "bits_per_weight": self.bits_per_weight,
            "float_bits_pct": self.float_bits_pct,
            "weights_left_pct": self.weights_left_pct,
            "param_count": self.param_count,
            "ideal_bytes": self.ideal_bytes,
            "payload_ideal_bytes": self.payload_ideal_bytes,
            "float32_bytes": self.float32_bytes,
            "channels_left": {k: v[0] for k, v in self.channels.items()},
        }


@torch.no_grad()
def report(model: nn.Module) -> SizeReport:
    """Plain numbers describing the model's size now (see the module docstring for the rule)."""
    ref = reference_of(model)
    by_kind = {"weight": 0, "qat_weight": 0, "meta": 0, "float": 0}
    for kind, bits in _stored_bits(model):
        by_kind[kind] += bits
    weights_stored = 0
    channels = {}
    for name, layer in sc_layers(model):
        live_out = int(layer.live_out().sum())
        weights_stored += live_out * int(_live_inputs(layer)) * layer.kernel_numel()
        channels[name] = (live_out, ref.out_channels.get(name, layer.weight.shape[0]))
    quant_params = {id(p) for _, layer in sc_layers(model) for p in (layer.b, layer.e) if p is not None}
    return SizeReport(
        weight_bits=by_kind["weight"] + by_kind["qat_weight"],
        float_bits=by_kind["float"],
        meta_bits=by_kind["meta"],
        reference_scalars=ref.scalars,
        weights_stored=weights_stored,
        reference_weights=ref.weights,
        param_count=sum(p.numel() for p in model.parameters() if id(p) not in quant_params),
        channels=channels,
        dead_channels=sum(int((~layer.live_out()).sum()) for _, layer in sc_layers(model)),
    )
