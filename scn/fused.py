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

each sum over one output channel's weights, in the order autograd sums them. The same
function can also return the size term Q of scn.size (`prepare`, what the training loop
calls), sharing its per-channel arithmetic. `quantize_` installs the function as a forward
pre-hook of the model; layers called on their own, and models under torch.compile (whose
inductor fuses the reference formulation), use the reference.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from scn.quant import MAX_BITS, raise_live_bits, sc_layers
from scn.size import SizeInputs, q_of_stored

LN2 = math.log(2)
_STEP = "_scn_step"  # a layer's quantized weight for the forward pass under way
_PLAN = "_scn_fused_plan"


@dataclass
class Plan:
    """What the function needs that changes only when the model does (surgery, .to, a new mask)."""

    layers: list  # the quantized scn.quant.SCLayer modules, in model order
    sizes: list[int]  # output channels per layer
    masks: list[torch.Tensor] | None  # live inputs as the weight's dtype; None when all live
    dims: list[tuple[int, ...]]  # the dimensions one output channel's weights span
    round_bits: bool
    key: tuple
    min_bits: int = 1
    buffers: list[torch.Tensor] = field(default_factory=list)  # per layer: [4, *weight.shape]
    slots: list[list[torch.Tensor]] = field(default_factory=list)  # [k][layer]: buffers[layer][k]
    holder: weakref.ref | None = None  # the pass whose backward still needs `buffers`
    stashed: tuple | None = None  # parameter versions the weights in the layers were made from

    @property
    def channels(self) -> int:
        return sum(self.sizes)

    def params(self) -> list[torch.Tensor]:
        return [m.weight for m in self.layers] + [m.b for m in self.layers] + [m.e for m in self.layers]

    def versions(self) -> tuple:
        return tuple(p._version for p in self.params())

    def factor_buffers(self, ctx) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        """Per layer, room for the four per-weight factors the backward pass sums against, laid
        out like the weight (so each channel sums in autograd's order), and the four lists of
        per-layer slots in it. Reused from pass to pass, except while a pass that holds them
        awaits its backward (two forwards, then one backward)."""
        owner = self.holder() if self.holder is not None else None
        if owner is not None and not getattr(owner, "done", False):
            return _factor_buffers(self.layers)
        if not self.buffers:
            self.buffers, self.slots = _factor_buffers(self.layers)
        self.holder = weakref.ref(ctx)
        return self.buffers, self.slots


def _factor_buffers(layers: list) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    buffers = [_like_weight(m.weight, 4) for m in layers]
    return buffers, [[buf[k] for buf in buffers] for k in range(4)]


def _key(layers: list) -> tuple:
    return tuple((id(m.weight), m.weight.shape, m.weight.dtype, m.weight.device, id(m.b), id(m.e),
                  m.b.dtype, m.e.dtype, id(m.in_alive), m.in_alive._version, m.round_bits, m.min_bits)
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
    if not layers or layers[0].weight.device.type == "meta":  # shape checks: the reference
        return None
    kinds = {(m.weight.dtype, m.b.dtype, m.e.dtype, m.weight.device, m.round_bits, m.min_bits)
             for m in layers}
    if len(kinds) > 1 or len({layers[0].weight.dtype, layers[0].b.dtype, layers[0].e.dtype}) > 1:
        return None
    masks = []
    for m in layers:
        shape = (1, -1) + (1,) * (m.weight.dim() - 2)
        masks.append(m.in_alive.view(shape).to(m.weight.dtype))
    if all(bool(m.in_alive.all()) for m in layers):  # once per plan: multiplying by 1 is exact
        masks = None
    return Plan(layers=layers, sizes=[m.weight.shape[0] for m in layers], masks=masks,
                dims=[tuple(range(1, m.weight.dim())) for m in layers],
                round_bits=layers[0].round_bits, key=key, min_bits=layers[0].min_bits)


class _Quantize(torch.autograd.Function):
    """(plan, size inputs or None, train, *weights, *bit depths, *exponents) -> every layer's
    quantized, masked weight (and Q when size inputs are given)."""

    @staticmethod
    def forward(ctx, plan: Plan, size: SizeInputs | None, train: bool, *params: torch.Tensor):
        n, sizes, c = len(plan.sizes), plan.sizes, plan.channels
        per_channel = torch.cat(params[n:]).view(2, c)
        if plan.round_bits:
            bits, exponent = per_channel.round().unbind(0)
            bits = raise_live_bits(bits, plan.min_bits)
            raw_bits = None
        else:
            raw_bits, exponent = per_channel.unbind(0)
            bits, exponent = raw_bits, exponent.round()
        below_max = bits < MAX_BITS  # where the reference's clamp passes b's gradient (not at 16)
        bits = bits.clamp(0, MAX_BITS)  # below 1 bit every channel is dead alike
        scale = torch.exp2(exponent)
        if plan.round_bits:  # 2^(integer) is exact however exp2 is evaluated
            half = torch.exp2(bits - 1)
        else:  # a real b: evaluate exp2 on the reference's lengths (vector and scalar paths differ)
            half = torch.cat([torch.exp2(x.view(-1, 1, 1, 1) - 1) for x in bits.split(sizes)]).view(c)
        live = torch.sign(bits)  # 1 where the channel is live, 0 where dead (bits >= 0 here)
        # A dead channel's bounds are 0, so its codes, and all its gradients, are zeros.
        live_half = half * live
        lo = -live_half
        hi = live_half - live
        scales, los, his = (_pieces(t.view(c, 1, 1, 1), sizes, plan) for t in (scale, lo, hi))
        u = torch._foreach_div(params[:n], scales)
        clipped = torch._foreach_clamp_min(u, los)
        torch._foreach_clamp_max_(clipped, his)
        ctx.plan, ctx.size, ctx.train = plan, size, train
        if train:
            codes = _save_factors(ctx, plan, u, clipped, los, his)
        else:
            codes = torch._foreach_round(clipped)
        out = torch._foreach_mul(codes, scales)
        if plan.masks is not None:
            torch._foreach_mul_(out, plan.masks)
        if train:
            ctx.scale = scale
            # d/db of -2^(B-1) and 2^(B-1) - 1, times 2^e / 2 (f_lo, f_hi are doubled), where the
            # clamp passes a gradient, 0 in a dead channel. All powers of two: exact.
            ctx.bound_factor = torch.stack([lo, live_half]) * (scale * 0.5 * below_max)
        if size is None:
            return tuple(out)
        if plan.round_bits:  # what the file stores, and where Q's clamp passes a gradient
            stored, inside = bits, live * below_max
        else:
            stored = raw_bits.ceil()
            inside = (stored > 0) & (stored < MAX_BITS)
            stored = stored.clamp(0, MAX_BITS)
        ctx.inside = inside
        ctx.q_factor = size.gradient_factor(stored)
        return (*out, q_of_stored(stored, size, scale.dtype))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        plan, size = ctx.plan, ctx.size
        n, sizes = len(plan.sizes), plan.sizes
        g = grads[:n] if plan.masks is None else torch._foreach_mul(grads[:n], plan.masks)
        dw = torch._foreach_mul(g, ctx.f) if any(ctx.needs_input_grad[3:3 + n]) else [None] * n
        if [buf._version for buf in ctx.factors] != ctx.versions:
            raise RuntimeError("scn.fused: a forward pass of this model ran after the one being "
                               "differentiated had already been differentiated once; call "
                               "backward once per forward pass (retain_graph is not supported).")
        ctx.done = True  # the factor buffers may serve the next forward pass
        # Each channel's four sums over its weights, in the order autograd's reductions sum.
        products = torch._foreach_mul(g, ctx.factors)
        r = torch.cat([p.sum(tuple(d + 1 for d in dim))
                       for p, dim in zip(products, plan.dims, strict=True)], dim=1)
        r_codes, r_fu, _, _ = r.unbind(0)
        de = (r_codes - r_fu) * ctx.scale * LN2
        db = [None] * n
        if any(ctx.needs_input_grad[3 + n:3 + 2 * n]):
            db = (r[2:] * ctx.bound_factor * LN2).sum(0)
            if size is not None:  # Q's gradient, added as autograd adds a second use of b
                db = db + (grads[n] / size.scalars) * ctx.q_factor * ctx.inside
            db = db.split(sizes)
        return (None, None, None, *dw, *db, *de.split(sizes))


def _save_factors(ctx, plan: Plan, u, clipped, los, his) -> list[torch.Tensor]:
    """What the backward pass multiplies the weight gradients with: f for dw, and for the four
    per-channel sums codes, f * u, 2 f_lo and 2 f_hi (exact small integers and halves), written
    into the factor buffers. Returns the codes (round(clipped)), which live there."""
    ctx.factors, (codes, fu, below, above) = plan.factor_buffers(ctx)
    torch._foreach_copy_(below, los)
    torch._foreach_sub_(below, u)  # lo - u, whose sign is 1 below lo, 0 at lo, -1 above
    torch._foreach_sign_(below)
    torch._foreach_copy_(above, u)
    torch._foreach_sub_(above, his)  # u - hi: -1 below hi, 0 at hi, 1 above
    torch._foreach_sign_(above)
    inside = torch._foreach_add(below, above)  # -2f (0 in a dead channel: lo = hi)
    torch._foreach_mul_(inside, -0.5)
    torch._foreach_copy_(fu, u)
    torch._foreach_mul_(fu, inside)
    torch._foreach_add_(below, 1.0)  # 2 f_lo
    torch._foreach_add_(above, 1.0)  # 2 f_hi
    torch._foreach_copy_(codes, clipped)
    torch._foreach_round_(codes)
    ctx.f = inside
    ctx.versions = [buf._version for buf in ctx.factors]
    return codes


def _in_layout_of(w: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`w` with the parameter's strides, which the convolution's choice of kernel follows: with
    one input channel an elementwise result may come back NCHW where the weight is
    channels-last, and would send the convolution down the slower NCHW path."""
    return w if w.stride() == weight.stride() else torch.empty_like(weight).copy_(w)


def _like_weight(w: torch.Tensor, n: int) -> torch.Tensor:
    """An empty [n, *w.shape] whose every [i] has w's memory order."""
    order = sorted(range(w.dim()), key=lambda d: -w.stride(d))
    base = torch.empty((n,) + tuple(w.shape[d] for d in order), dtype=w.dtype, device=w.device)
    return base.permute(0, *[order.index(d) + 1 for d in range(w.dim())])


def _pieces(t: torch.Tensor, sizes: list[int], plan: Plan) -> list[torch.Tensor]:
    """Per-channel values [C, 1, 1, 1] as one piece per layer, shaped to broadcast over it."""
    pieces = list(t.split(sizes))
    for i, m in enumerate(plan.layers):
        if m.weight.dim() != 4:
            pieces[i] = pieces[i].view((-1,) + (1,) * (m.weight.dim() - 1))
    return pieces


def quantized_weights(plan: Plan, size: SizeInputs | None = None) -> tuple[torch.Tensor, ...]:
    """Every planned layer's quantized, masked weight, each in its parameter's memory layout
    (then Q, when `size` is given)."""
    params = plan.params()
    train = torch.is_grad_enabled() and any(p.requires_grad for p in params)
    out = _Quantize.apply(plan, size, train, *params)
    n = len(plan.layers)
    weights = tuple(_in_layout_of(w, m.weight) for w, m in zip(out[:n], plan.layers, strict=True))
    return weights + tuple(out[n:])


def prepare(model: nn.Module, size: SizeInputs, learning: list) -> torch.Tensor | None:
    """Quantize every layer for the model's next forward pass and return Q from the same
    function; None when the model's layers do not fit one function with Q (then use scn.size)."""
    plan = plan_of(model)
    if plan is None or [id(m) for m in plan.layers] != [id(m) for m in learning]:
        return None
    *weights, q = quantized_weights(plan, size)
    for m, w in zip(plan.layers, weights, strict=True):
        m.__dict__[_STEP] = w
    plan.stashed = plan.versions()
    return q


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
    if plan.stashed is not None and plan.stashed == plan.versions():
        return  # `prepare` made them from the parameters as they are
    for m, w in zip(plan.layers, quantized_weights(plan), strict=True):
        m.__dict__[_STEP] = w


def after_forward(model: nn.Module, args, output) -> None:
    """Forward hook (also after an exception): the weights belong to that forward pass only."""
    if torch.compiler.is_compiling():
        return
    plan = model.__dict__.get(_PLAN)
    if plan is not None:
        plan.stashed = None
        for m in plan.layers:
            m.__dict__.pop(_STEP, None)


def install(model: nn.Module) -> None:
    """Make every forward pass of `model` quantize its layers with the fused function."""
    model.register_forward_pre_hook(before_forward)
    model.register_forward_hook(after_forward, always_call=True)
