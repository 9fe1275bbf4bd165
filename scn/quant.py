"""The quantizer: q(x, b, e) with a straight-through estimator, and the layers that use it.

`quantize_(model, method)` (a scn.methods config class) converts every `nn.Conv2d` /
`nn.Linear` of a model in place into
`SCConv2d` / `SCLinear` (torchao-style: one call, the model keeps its structure). We convert
modules rather than attach parametrizations because channel surgery must slice a layer's
weight, bias, bit depths and exponents together; having them as plain attributes of one
module keeps that slicing obvious.

Every converted layer owns, per output channel, a real-valued bit depth `b` and exponent `e`.
The forward pass uses integer versions of both (rounded with a straight-through estimator):

    q(x, b, e) = 2^e * round(clamp(2^-e x, -2^(b-1), 2^(b-1) - 1))

Rounding `e` makes the scale a power of two, which is what the file stores (a small integer).
Rounding `b` (the default, `round_bits=True`) makes the values a channel can hold exactly the
values of a `round(b)`-bit two's-complement code, so the size term the optimizer sees equals
the size of the stored file, bit for bit. With `round_bits=False` the forward pass uses the
real `b`, as in the paper; a channel then needs `ceil(b)` bits on disk.

A channel whose integer bit depth is <= 0 outputs exactly zero weights. Its `b` then gets no
gradient from either loss term, so death is final: this is what makes it safe to remove the
channel physically (see `scn/surgery.py`); a warm-up of the size-loss weight keeps channels
from dying before the weights have learned anything.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from scn.reference import Reference

MAX_BITS = 16  # the file format stores bit depths 0..16

def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Straight-through rounding: the forward pass rounds, the backward pass is the identity."""
    return x + (torch.round(x) - x).detach()


def ceil_ste(x: torch.Tensor) -> torch.Tensor:
    """Straight-through ceiling (a real-valued b is stored with ceil(b) bits)."""
    return torch.ceil(x) + (x - x.detach())


def raise_live_bits(bits: torch.Tensor, min_bits: int) -> torch.Tensor:
    """Rounded bit depths with every live channel held at `min_bits` or more (dead ones stay
    at 0), straight through: with min_bits 2 a channel goes from 2 bits to 0, never through the
    sign-less 1-bit grid {-1, 0}."""
    if min_bits <= 1:
        return bits
    raised = torch.where(bits > 0, bits.clamp(min=min_bits), bits)
    return bits + (raised - bits).detach()


def quantize(
    w: torch.Tensor, bits: torch.Tensor, exponent: torch.Tensor, round_bits: bool = True,
    min_bits: int = 1,
) -> torch.Tensor:
    """Quantize `w` per output channel (dim 0) with bit depths `bits` and exponents `exponent`.

    `bits` and `exponent` are 1-D, one entry per output channel, real-valued; both are rounded
    with a straight-through estimator (bits only when `round_bits`; live channels then hold at
    least `min_bits`). Channels with bit depth <= 0 come out as exact zeros.
    """
    shape = (-1,) + (1,) * (w.dim() - 1)
    b = raise_live_bits(round_ste(bits), min_bits) if round_bits else bits
    b = b.clamp(max=MAX_BITS).view(shape)
    scale = torch.exp2(round_ste(exponent)).view(shape)
    low = -torch.exp2(b - 1)
    high = torch.exp2(b - 1) - 1
    # minimum/maximum (not clamp) so that the bounds, and hence b, receive gradients.
    codes = round_ste(torch.minimum(torch.maximum(w / scale, low), high))
    q = codes * scale
    return torch.where(b > 0, q, torch.zeros_like(q))


def initial_exponent(w: torch.Tensor, bits: float) -> torch.Tensor:
    """Per-channel exponent that makes the initial quantization at `bits` close to lossless.

    The largest power-of-two step that still represents the channel's largest |w| without
    clipping: e = ceil(log2(max|w| / (2^(bits-1) - 1))). A smaller e would clip the large
    weights (accuracy collapses at step 0); a larger one would waste resolution. At 8 bits
    the rounding error is then below 1/128 of the channel's range.
    """
    top = w.detach().abs().flatten(1).amax(dim=1).clamp(min=1e-12)
    levels = max(2 ** (bits - 1) - 1, 0.5)
    return torch.ceil(torch.log2(top / levels))


def best_exponents(w: torch.Tensor, bits: torch.Tensor, exponent: torch.Tensor,
                   reach: int = 3) -> torch.Tensor:
    """Per output channel, the integer exponent within `reach` of round(`exponent`) whose
    quantization of `w` at the integer `bits` has the least squared error (ties: the smaller)."""
    flat = w.detach().flatten(1)
    bits = bits.to(flat.dtype)
    base = torch.round(exponent.detach()).to(flat.dtype)
    errors = [((flat - quantize(flat, bits, base + k)) ** 2).sum(1) for k in range(-reach, reach + 1)]
    return base + torch.stack(errors).argmin(0).to(flat.dtype) - reach


class SCLayer:
    """What SCConv2d and SCLinear share: per-channel b and e, and folded dead inputs.

    `b`, `e`: learnable, one per output channel (None for float layers).
    `in_alive`: bool mask of input channels (features for a Linear) still fed by a live
    producer. Dead inputs are multiplied by zero in the forward pass and not counted in the
    size; physical surgery drops them instead.
    `input_offset`: what the removed/masked inputs still contributed, folded exactly (their
    value was an input-independent constant, e.g. a BatchNorm bias through a ReLU).
    """

    weight: nn.Parameter
    b: nn.Parameter | None
    e: nn.Parameter | None
    in_alive: torch.Tensor
    input_offset: torch.Tensor
    round_bits: bool
    min_bits: int = 1  # the fewest bits a live channel holds (scn.methods.SelfCompress.min_bits)

    def _init_quant(self, bits: float | None, learn_bits: bool, round_bits: bool) -> None:
        out_channels = self.weight.shape[0]
        self.round_bits = round_bits
        if bits is None:
            self.b = None
            self.e = None
        else:
            b = torch.full((out_channels,), float(bits), device=self.weight.device)
            self.b = nn.Parameter(b, requires_grad=learn_bits)
            self.e = nn.Parameter(initial_exponent(self.weight, bits))
        alive = torch.ones(self.weight.shape[1], dtype=torch.bool, device=self.weight.device)
        self.register_buffer("in_alive", alive)
        self.register_buffer("input_offset", torch.zeros(0, device=self.weight.device))

    @property
    def quantized(self) -> bool:
        return self.b is not None

    def int_bits(self) -> torch.Tensor:
        """Bit depth each output channel is stored with (0 = dead); float layers give 32."""
        if self.b is None:
            return torch.full((self.weight.shape[0],), 32, dtype=torch.long, device=self.weight.device)
        return raise_live_bits(self._whole_bits().clamp(0, MAX_BITS), self.min_bits).long()

    def _whole_bits(self) -> torch.Tensor:
        """b as a whole number of bits, before any min_bits floor (ceil(b) for a real-valued b)."""
        b = self.b.detach()
        return torch.round(b) if self.round_bits else torch.ceil(b)

    def int_exponents(self) -> torch.Tensor:
        assert self.e is not None
        return torch.round(self.e.detach()).long()

    def live_out(self) -> torch.Tensor:
        """Bool per output channel: True unless its bit depth has reached 0."""
        return self.int_bits() > 0

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward pass uses: quantized, with dead inputs zeroed.

        Inside `frozen(model)` (evaluation, inference) it is computed once and reused.
        """
        return self._cached("weight", self._quantized_weight)

    def _cached(self, key, compute) -> torch.Tensor:
        cache = self.__dict__.get("_scn_frozen")
        if cache is None:
            return compute()
        if key not in cache:
            cache[key] = compute()
        return cache[key]

    def _quantized_weight(self) -> torch.Tensor:
        fused = self.__dict__.get("_scn_step")  # set by scn.fused for its model's forward pass
        if fused is not None:
            return fused
        w = self.weight
        if self.b is not None:
            w = quantize(w, self.b, self.e, self.round_bits, self.min_bits)
        # Always multiply (no `if mask.all()`): a branch on a GPU tensor would sync the host.
        shape = (1, -1) + (1,) * (w.dim() - 2)
        w = w * self.in_alive.view(shape).to(w.dtype)
        if w.stride() != self.weight.stride():
            # Keep the parameter's exact layout: with one input channel, channels-last and NCHW
            # strides differ only on a size-1 dimension, and elementwise ops may pick NCHW,
            # which would send the convolution and everything after it down the NCHW path.
            w = torch.empty_like(self.weight).copy_(w)
        return w

    def kernel_numel(self) -> int:
        return int(math.prod(self.weight.shape[2:]))

    def refit_exponents(self) -> None:
        """Set each live channel's exponent to the one that quantizes its weights at its
        stored bit depth with the least squared error (`quant.exponent_refit`)."""
        if self.b is None:
            return
        bits = self.int_bits()
        live = bits > 0
        best = best_exponents(self.weight[live], bits[live], self.e[live])
        with torch.no_grad():
            self.e[live] = best.to(self.e.dtype)

    def refine_bits(self, bits: int) -> None:
        """Raise each live channel stored with fewer than `bits` bits to `bits`, its exponent
        lowered as much: a finer grid with the same negative end, so it holds every value the
        coarser one did (`trainer.budget_bits`). Every live b below `bits` is set to it, also
        one a `min_bits` floor already stores with that many: it is then far from 0."""
        if self.b is None:
            return
        stored = self.int_bits()
        lifted = (stored > 0) & (self._whole_bits() < bits)  # whatever the floor stores
        shift = (bits - stored).clamp(min=0)
        refined = lifted & (shift > 0)
        with torch.no_grad():
            self.b[lifted] = float(bits)
            self.e[refined] = torch.round(self.e[refined]) - shift[refined].to(self.e.dtype)


def _layout(x: torch.Tensor) -> torch.memory_format:
    cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if cl else torch.contiguous_format


class SCConv2d(nn.Conv2d, SCLayer):
    """nn.Conv2d whose weights go through q(x, b, e) (or stay float when b is None)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._strided_pointwise() and x.device.type == "cpu":
            # oneDNN's backward pass of a strided 1x1 convolution over a few channels-last input
            # channels hangs or corrupts memory on AVX2 CPUs (seen with torch 2.14). Subsampling
            # first is the same convolution, exactly, with a quarter of the work.
            sh, sw = self.stride
            y = F.conv2d(x[:, :, ::sh, ::sw], self.effective_weight(), self.bias)
        else:
            y = self._conv_forward(x, self.effective_weight(), self.bias)
        if self.input_offset.numel():
            y = y + self._offset_map(x)
        return y

    def _strided_pointwise(self) -> bool:
        return (self.kernel_size == (1, 1) and self.stride != (1, 1) and self.padding in ((0, 0), "valid")
                and self.groups == 1)

    def _offset_map(self, x: torch.Tensor) -> torch.Tensor:
        # The folded inputs were constant images; convolving a ones-image with the folded
        # kernel gives their exact contribution, zero padding at the borders included.
        def compute() -> torch.Tensor:
            ones = x.new_ones((1, 1) + tuple(x.shape[-2:]))
            offset = self._conv_forward(ones, self.input_offset.to(x.dtype), None)
            # Match the input's layout: adding an NCHW map to a channels-last output would
            # turn the output, and every layer after it, into the slower NCHW layout.
            return offset.contiguous(memory_format=_layout(x))

        return self._cached(("offset", tuple(x.shape[-2:]), x.dtype, x.device), compute)


class SCLinear(nn.Linear, SCLayer):
    """nn.Linear whose weights go through q(x, b, e) (or stay float when b is None)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.effective_weight(), self.bias)
        if self.input_offset.numel():
            y = y + self.input_offset.to(y.dtype)
        return y


def _converted(layer: nn.Module, bits: float | None, learn_bits: bool, round_bits: bool):
    kw = {"bias": layer.bias is not None, "device": layer.weight.device, "dtype": layer.weight.dtype}
    if isinstance(layer, nn.Conv2d):
        new = SCConv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
            layer.padding, layer.dilation, layer.groups, padding_mode=layer.padding_mode, **kw,
        )
    else:
        new = SCLinear(layer.in_features, layer.out_features, **kw)
    new.weight = layer.weight  # the same Parameter objects: nothing is re-initialised
    new.bias = layer.bias
    new.train(layer.training)
    new._init_quant(bits, learn_bits, round_bits)
    return new


@contextmanager
def frozen(model: nn.Module):
    """Reuse each layer's quantized weights (and folded offsets) for every forward pass inside.

    Quantizing the weights costs about as much as a forward pass at batch size 1; evaluation
    and inference, where nothing changes, need it once. Changing the model inside is a bug.
    """
    layers = [m for m in model.modules() if isinstance(m, SCLayer)]
    for layer in layers:
        layer.__dict__["_scn_frozen"] = {}
    try:
        yield model
    finally:
        for layer in layers:
            layer.__dict__.pop("_scn_frozen", None)


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv2d and Linear layers of `model` in definition order, with their qualified names."""
    return [
        (name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]


def quantize_(model: nn.Module, method) -> nn.Module:
    """Convert every Conv2d/Linear of `model` in place into an SC layer and return `model`.

    `method` is one of scn.methods' config classes (SelfCompress, FixedBits, Float, a plugin):
    it gives each quantized layer's initial bit depth, whether b learns and how it rounds.
    Layers it keeps float (first/last when not quantized, or all for Float) are still
    converted, as float SC layers, so that surgery and size accounting treat every layer alike.
    """
    layers = weight_layers(model)
    if not layers:
        raise ValueError("the model has no nn.Conv2d or nn.Linear layer to quantize")
    model.scn_reference = Reference.of(model)  # the denominator of every size ratio
    model.scn_scheme = method
    for i, (name, layer) in enumerate(layers):
        if isinstance(layer, SCLayer):
            raise ValueError(f"layer {name!r} is already converted; call quantize_ once")
        float_layer = ((i == 0 and not method.quantize_first)
                       or (i == len(layers) - 1 and not method.quantize_last))
        bits = None if float_layer else method.layer_bits()
        new = _converted(layer, bits, method.learns_bits, method.round_bits)
        new.min_bits = method.min_bits
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    from scn import fused  # here: scn.fused builds on this module

    fused.install(model)
    return model


def sc_layers(model: nn.Module) -> list[tuple[str, SCLayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SCLayer)]


def refit_exponents(model: nn.Module) -> None:
    """Refit every quantized layer's live exponents (SCLayer.refit_exponents) when the model's
    method asks for it (`quant.exponent_refit`); otherwise nothing."""
    if getattr(getattr(model, "scn_scheme", None), "exponent_refit", False):
        for _, layer in sc_layers(model):
            layer.refit_exponents()


def quant_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The b and e parameters (those that train), for their own optimizer group."""
    params = []
    for _, layer in sc_layers(model):
        params += [p for p in (layer.b, layer.e) if p is not None and p.requires_grad]
    return params


def weight_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every trainable parameter that is not a b or an e."""
    quant = {id(p) for p in quant_parameters(model)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in quant]
