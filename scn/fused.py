"""The fused quantizer: q(w, b, e) of every quantized layer of a model, and its gradients, at once.

`scn.quant.quantize` is the reference: per layer, written for autograd, about thirty small
operations forward and as many backward. Here one autograd function quantizes all layers of
a model with straight-through gradients in closed form: the per-channel arithmetic (bit depth,
scale, bounds) runs once on every channel of the network, concatenated, and the per-weight
arithmetic runs as `torch._foreach_*` operations, one dispatch for all layers. Values and
gradients equal the reference's (tests/test_fused.py compares them bit for bit, up to the sign
of a zero), because the scale 2^e is a power of two: dividing or multiplying by it is exact.

With u = w / 2^e clipped to [lo, hi] = [-2^(B-1), 2^(B-1) - 1], g the weight's gradient:

    dw = g * f          f = 1 inside (lo, hi), 1/2 at a bound (torch's min/max split a tie), 0 out
    de = ln2 * 2^e * (sum g * codes - sum g * f * u)
    db = ln2 * 2^(B-1) * 2^e * (sum g * f_hi - sum g * f_lo)     (f_lo, f_hi: 1 beyond, 1/2 at)

each sum over one output channel's weights, in the order autograd sums them. `quantize_`
installs the function as a forward pre-hook of the model (`before_forward`); layers called on
their own, and models under torch.compile (whose inductor fuses the reference), use the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from scn.quant import MAX_BITS, sc_layers

LN2 = math.log(2)
_STEP = "_scn_step"  # a layer's quantized weight for the forward pass under way
_PLAN = "_scn_fused_plan"


@dataclass
class Plan:
    """What the function needs that changes only when the model does (surgery, .to, a new mask)."""

    layers: list  # the quantized scn.quant.SCLayer modules, in model order
    sizes: list[int]  # output channels per layer
    masks: list[torch.Tensor]  # live inputs, as the weight's dtype, broadcastable to the weight
    dims: list[tuple[int, ...]]  # the dimensions one output channel's weights span
    round_bits: bool
    key: tuple

    @property
    def channels(self) -> int:
        return sum(self.sizes)


def _key(layers: list) -> tuple:
    return tuple((id(m.weight), m.weight.shape, m.weight.dtype, m.weight.device, id(m.b), id(m.e),
                  m.b.dtype, m.e.dtype, id(m.in_alive), m.in_alive._version, m.round_bits)
                 for m in layers)


def plan_of(model: nn.Module) -> Plan | None:
    """The model's plan, rebuilt when its layers changed; None when the layers cannot share
    one function (mixed dtypes or devices, mixed rounding) or none is quantized."""
    layers = [m for _, m in sc_layers(model) if m.quantized]
    key = _key(layers)
    plan = model.__dict__.get(_PLAN)
    if plan is not None and plan.key == key:
        return plan
    plan = _build(layers, key)
    model.__dict__[_PLAN] = plan
    return plan


def _build(layers: list, key: tuple) -> Plan | None:
    if not layers:
        return None
    kinds = {(m.weight.dtype, m.b.dtype, m.e.dtype, m.weight.device, m.round_bits) for m in layers}
    if len(kinds) > 1 or layers[0].weight.dtype != layers[0].b.dtype:
        return None
    masks = []
    for m in layers:
        shape = (1, -1) + (1,) * (m.weight.dim() - 2)
        masks.append(m.in_alive.view(shape).to(m.weight.dtype))
    return Plan(layers=layers, sizes=[m.weight.shape[0] for m in layers], masks=masks,
                dims=[tuple(range(1, m.weight.dim())) for m in layers],
                round_bits=layers[0].round_bits, key=key)


class _Quantize(torch.autograd.Function):
    """(plan, *weights, *bit depths, *exponents) -> every layer's quantized, masked weight."""

    @staticmethod
    def forward(ctx, plan: Plan, *params: torch.Tensor):
        n, sizes = len(plan.sizes), plan.sizes
        weights, bits, exponents = params[:n], params[n:2 * n], params[2 * n:]
        c = plan.channels
        b = torch.cat(bits).view(c, 1, 1, 1)
        if plan.round_bits:
            b = b.round()
        below_max = b < MAX_BITS  # where the reference's clamp passes b's gradient (not at 16)
        b = b.clamp(max=MAX_BITS)
        scale = torch.exp2(torch.cat(exponents).view(c, 1, 1, 1).round())
        if plan.round_bits:  # 2^(integer) is exact however exp2 is evaluated
            half = torch.exp2(b - 1)
        else:  # a real b: evaluate exp2 on the reference's lengths (vector and scalar paths differ)
            half = torch.cat([torch.exp2(x - 1) for x in b.split(sizes)])
        live = b > 0
        neg_half = -half
        # A dead channel's bounds are 0, so its codes are exact zeros, as the reference's where.
        lo = torch.where(live, neg_half, 0.0)
        hi = torch.where(live, half - 1, 0.0)
        per_layer = [_pieces(t, sizes, plan) for t in (scale, lo, hi)]
        scales, los, his = per_layer
        u = torch._foreach_div(weights, scales)
        clipped = torch._foreach_clamp_min(u, los)
        torch._foreach_clamp_max_(clipped, his)
        codes = torch._foreach_round(clipped)
        out = torch._foreach_mul(codes, scales)
        torch._foreach_mul_(out, plan.masks)
        if any(ctx.needs_input_grad[1:]):
            below = torch._foreach_sub(u, los)  # sign: -1 below lo, 0 at lo, 1 above
            torch._foreach_sign_(below)
            above = torch._foreach_sub(u, his)
            torch._foreach_sign_(above)
            inside = torch._foreach_sub(below, above)  # 2f
            torch._foreach_mul_(inside, 0.5)
            ctx.f, ctx.fu, ctx.codes = inside, torch._foreach_mul(inside, u), codes
            torch._foreach_neg_(below)
            torch._foreach_add_(below, 1.0)  # 2 f_lo
            torch._foreach_add_(above, 1.0)  # 2 f_hi
            ctx.lo2, ctx.hi2 = below, above
            ctx.live = _pieces(live.to(b.dtype), sizes, plan)
            flat_scale = scale.view(c)
            ctx.scale, ctx.half_scale = flat_scale, flat_scale * 0.5
            ctx.signed_half = torch.stack([neg_half.view(c), half.view(c)])
            ctx.below_max = below_max.view(c)
        ctx.plan = plan
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        plan = ctx.plan
        n, sizes = len(plan.sizes), plan.sizes
        g = torch._foreach_mul(grads, plan.masks)
        torch._foreach_mul_(g, ctx.live)
        dw = torch._foreach_mul(g, ctx.f) if any(ctx.needs_input_grad[1:n + 1]) else [None] * n
        products = [torch._foreach_mul(g, t) for t in (ctx.codes, ctx.fu, ctx.lo2, ctx.hi2)]
        # One sum per layer and quantity: the order autograd's broadcast reductions sum in.
        sums = [p.sum(dim) for part in products for p, dim in zip(part, plan.dims, strict=True)]
        r = torch.cat(sums).view(4, plan.channels)
        de = (r[0] - r[1]) * ctx.scale * LN2
        db = None
        if any(ctx.needs_input_grad[n + 1:2 * n + 1]):
            db = ((r[2:] * ctx.half_scale) * ctx.signed_half * LN2).sum(0)
            db = torch.where(ctx.below_max, db, 0.0).split(sizes)
        return (None, *dw, *(db or [None] * n), *de.split(sizes))


def _pieces(t: torch.Tensor, sizes: list[int], plan: Plan) -> list[torch.Tensor]:
    """Per-channel values [C, 1, 1, 1] as one piece per layer, shaped to broadcast over it."""
    pieces = list(t.split(sizes))
    for i, m in enumerate(plan.layers):
        if m.weight.dim() != 4:
            pieces[i] = pieces[i].view((-1,) + (1,) * (m.weight.dim() - 1))
    return pieces


def quantized_weights(plan: Plan) -> tuple[torch.Tensor, ...]:
    """Every planned layer's quantized, masked weight, each in its parameter's memory layout."""
    params = [m.weight for m in plan.layers] + [m.b for m in plan.layers] + [m.e for m in plan.layers]
    out = _Quantize.apply(plan, *params)
    return tuple(w if w.stride() == m.weight.stride() else torch.empty_like(m.weight).copy_(w)
                 for w, m in zip(out, plan.layers, strict=True))


def before_forward(model: nn.Module, args) -> None:
    """Forward pre-hook: quantize every layer at once for the forward pass that follows."""
    if torch.compiler.is_compiling():
        return
    plan = plan_of(model)
    if plan is None:
        return
    frozen = plan.layers[0].__dict__.get("_scn_frozen")
    if frozen is not None and "weight" in frozen:
        return  # inside scn.quant.frozen: computed once already
    for m, w in zip(plan.layers, quantized_weights(plan), strict=True):
        m.__dict__[_STEP] = w


def after_forward(model: nn.Module, args, output) -> None:
    """Forward hook (also after an exception): the weights belong to that forward pass only."""
    if torch.compiler.is_compiling():
        return
    plan = model.__dict__.get(_PLAN)
    for m in plan.layers if plan is not None else ():
        m.__dict__.pop(_STEP, None)


def install(model: nn.Module) -> None:
    """Make every forward pass of `model` quantize its layers with the fused function."""
    model.register_forward_pre_hook(before_forward)
    model.register_forward_hook(after_forward, always_call=True)

