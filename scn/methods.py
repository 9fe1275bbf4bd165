"""Quantization methods, one config class each (torchao-style): `quantize_(model, SelfCompress())`.

A method knows how to convert a model's layers (`layer_bits`: a layer's initial bit depth, or
None to keep it float), what its size term is, and how it reports its size (`attach` returns a
`SizeTerm` bound to the model and its optimizer). scn's own methods:

    SelfCompress   learns b and e per output channel; Q is the size term (the paper's method)
    FixedBits      every channel at `init_bits`, exponents learned: the QAT baseline
    Float          float32 weights: the accuracy reference

Other methods (the DiffQ baseline) are plugins with the same interface, registered when their
module is imported; `PLUGINS` names the modules a file header may ask for.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import torch
from torch import nn

from scn import flops_charge, fused, size
from scn.columns import SPREADS, columns
from scn.errors import ConfigError
from scn.graph import ChannelGraph
from scn.quant import MAX_BITS, quantize_

__all__ = ["FixedBits", "Float", "Method", "Scheme", "SelfCompress", "SizeTerm",
           "from_header", "kind_of_target", "quantize_", "register"]

REGISTRY: dict[str, type[Method]] = {}
PLUGINS = {"diffq": "scn.diffq_baseline"}  # kind -> module that registers it (optional extras)
PRICES = ("bits", "uniform")  # SelfCompress.channel_price
# A file header's `scheme` keeps these keys for every method, so files stay as they were.
_HEADER_DEFAULTS = {"kind": None, "init_bits": 8.0, "round_bits": True, "quantize_first": True,
                    "quantize_last": True, "group_size": 8}
# Optional scheme keys, written only when they differ from their default (files of the
# paper's form stay as they were): min_bits fixes how a real-valued b of model.safetensors
# quantizes, so a reloaded model is the trained one.
_OPTIONAL_HEADER = {"min_bits": 1}


class SizeTerm:
    """scn's own accounting for a converted model: Q (differentiable in every trainable b, or
    None when nothing trains the size) and the size report."""

    def __init__(self, model: nn.Module, learns_bits: bool, live_input_grad: float = 0.0,
                 live_input_spread: str = "flat", flops_charge: float = 0.0,
                 channel_price: str = "bits") -> None:
        self.model = model
        self.learns_bits = learns_bits
        self.live_input_grad = live_input_grad  # scn.columns' charge: its weight and spread
        self.live_input_spread = live_input_spread
        self.flops_charge = flops_charge  # scn.flops_charge's strength (0: off)
        self.channel_price = channel_price  # SelfCompress.channel_price
        self.fixed = torch.zeros((), dtype=torch.float64)
        self.plan: size.SizePlan | None = None
        self.fused_inputs = None
        self.fuse = True  # Q from the quantizer's function (False under torch.compile)

    def refresh(self, device: torch.device, graph: ChannelGraph | None = None) -> None:
        """After a surgery: the bits no trainable b can change and Q's plan, once per shape
        (with the channel graph, the live-input and FLOPs charges' too)."""
        self.fixed = size.fixed_bits(self.model).to(device)
        self.plan = size.size_plan(self.model) if self.learns_bits else None
        if self.plan is not None:
            self.plan.uniform_price = self.channel_price == "uniform"
        if self.plan is not None and graph is not None:
            charges = (flops_charge.layer_charges(graph, self.flops_charge)
                       if self.flops_charge else None)
            self.plan.columns = columns(self.model, graph, self.plan.layers, self.live_input_grad,
                                        self.live_input_spread, charges)
            if charges:
                self.plan.weight_b = self.plan.weight_b * flops_charge.per_channel(
                    self.model, self.plan.layers, charges, self.plan.weight_b)
        self.fused_inputs = size.fused_inputs(self.plan, self.fixed) if self.plan else None

    def term(self) -> torch.Tensor | None:
        """Q, before the forward pass: computed with the layers' quantized weights, by one
        function (scn.fused.prepare), whose weights that forward pass then uses."""
        if not self.learns_bits:
            return None
        if self.fuse and self.plan is not None:
            q = fused.prepare(self.model, self.fused_inputs, self.plan.layers)
            if q is not None:
                return q
        return size.size_loss(self.model, self.fixed, self.plan)

    def report(self) -> size.SizeReport:
        return size.report(self.model)

    def row(self) -> dict:
        """Extra columns for a metrics row."""
        return {}

    def finish(self) -> dict:
        """At the end of training: leave the model as its files store it; extra summary entries."""
        return {}


@dataclass
class Method:
    """What every method shares: whether the first and last weight layers are quantized.

    Layers left in float still count in the reported size at 32 bits.
    """

    kind: ClassVar[str] = ""
    learns_bits: ClassVar[bool] = False  # whether b trains (and channels can die)
    packs: ClassVar[bool] = True  # whether a run writes model.scn and training checkpoints
    channels_last: ClassVar[bool] = True  # whether weights may use the channels-last layout
    round_bits: ClassVar[bool] = True
    min_bits: ClassVar[int] = 1  # the fewest bits a live channel holds (SelfCompress sets it)

    quantize_first: bool = True  # the first and last layers too (their size counts either way)
    quantize_last: bool = True

    def layer_bits(self) -> float | None:
        """The initial bit depth of a quantized layer (None: every layer stays float)."""
        return None

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> SizeTerm:
        return SizeTerm(model, self.learns_bits)

    def header(self) -> dict:
        """The file header's `scheme`: how to decode, not how it was trained."""
        optional = {k: getattr(self, k) for k, v in _OPTIONAL_HEADER.items() if getattr(self, k) != v}
        return {**_HEADER_DEFAULTS, **{k: v for k, v in asdict(self).items() if k in _HEADER_DEFAULTS},
                **optional, "kind": self.kind}


def register(cls: type[Method]) -> type[Method]:
    REGISTRY[cls.kind] = cls
    return cls


@dataclass
class Quantized(Method):
    """What the quantized methods share: every quantized layer starts at `init_bits` bits, its
    exponents where no weight is clipped at that bit depth. round_bits: the forward pass uses
    round(b) bits, what the file stores; False uses the real b, as in the paper (a channel then
    needs ceil(b) bits on disk)."""

    init_bits: float = 8
    round_bits: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.init_bits <= MAX_BITS:
            raise ConfigError(
                f"quant.init_bits={self.init_bits} is out of range: a {self.kind} layer needs an "
                f"initial bit depth in (0, {MAX_BITS}]. A channel at 0 bits is dead from the start; "
                "set e.g. quant.init_bits=8.")

    def layer_bits(self) -> float | None:
        return self.init_bits


@register
@dataclass
class SelfCompress(Quantized):
    """Learned bit depth b and exponent e per output channel (Cséfalvay & Imber, 2023)."""

    kind: ClassVar[str] = "self_compress"
    learns_bits: ClassVar[bool] = True
    init_bits: float = 3
    # Weight of the straight-through derivative of the live-input counts (scn/columns.py): a
    # channel is charged the input columns it keeps alive downstream. 0: counts are constants.
    live_input_grad: float = 0.0
    live_input_spread: str = "flat"  # flat: the column per bit; per_bit: column / the channel's bits
    # The fewest bits a live channel holds: 2 keeps channels off the sign-less 1-bit grid
    # {-1, 0} * 2^e, so a channel pulled below 2 bits dies (docs/study/channel_removal.md).
    min_bits: int = 1
    # At every surgery check, set each live channel's exponent to the one that quantizes its
    # weights with the least squared error at its bit depth (the learned e tends to clip).
    exponent_refit: bool = False
    # Scale the size term's gradient by each layer's uses per example (scn/flops_charge.py), so
    # that channels die where the FLOPs are; 0: off, Q's gradient as the paper has it.
    flops_charge: float = 0.0
    # How Q's pull on b is shared among channels: "bits" as Q's gradient has it (a channel pays
    # its weights and columns); "uniform": every live channel gets the mean of those, so the
    # task loss alone decides which channels die (docs/study/channel_removal.md, 14th round).
    channel_price: str = "bits"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.min_bits, int) and 1 <= self.min_bits <= MAX_BITS):
            raise ConfigError(f"quant.min_bits={self.min_bits} is invalid: it is the fewest bits a "
                              f"live channel holds, an integer from 1 (the paper's) to {MAX_BITS}.")
        if self.min_bits > 1 and not self.round_bits:
            raise ConfigError("quant.min_bits > 1 needs quant.round_bits=true: with a real-valued "
                              "bit depth there is no rounded depth to hold live channels at.")
        if not self.live_input_grad >= 0:
            raise ConfigError(f"quant.live_input_grad={self.live_input_grad} is invalid: it "
                              "weighs a gradient and must be >= 0 (0 = off, 1 = the full charge).")
        if not self.flops_charge >= 0:
            raise ConfigError(f"quant.flops_charge={self.flops_charge} is invalid: it weighs a "
                              "gradient and must be >= 0 (0 = off).")
        if self.channel_price not in PRICES:
            raise ConfigError(f"quant.channel_price={self.channel_price!r} is invalid; "
                              f"valid choices are {', '.join(PRICES)}.")
        if self.live_input_spread not in SPREADS:
            raise ConfigError(f"quant.live_input_spread={self.live_input_spread!r} is invalid; "
                              f"valid choices are {', '.join(SPREADS)}.")

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> SizeTerm:
        return SizeTerm(model, self.learns_bits, self.live_input_grad, self.live_input_spread,
                        self.flops_charge, self.channel_price)


@register
@dataclass
class FixedBits(Quantized):
    """Every channel at `init_bits` bits, exponents learned: quantization-aware training."""

    kind: ClassVar[str] = "fixed"
    init_bits: float = 4


@register
@dataclass
class Float(Method):
    """Float32 weights: the accuracy reference."""

    kind: ClassVar[str] = "none"


def _class_of(kind) -> type[Method]:
    if isinstance(kind, str) and kind not in REGISTRY and kind in PLUGINS:
        importlib.import_module(PLUGINS[kind])
    if not isinstance(kind, str) or kind not in REGISTRY:
        known = ", ".join([*REGISTRY, *(k for k in PLUGINS if k not in REGISTRY)])
        raise ConfigError(f"quant.kind={kind!r} is not a quantization method; valid choices are "
                          f"{known} (pick one with quant=NAME).")
    return REGISTRY[kind]


def Scheme(kind: str = "self_compress", init_bits: float = 8.0, round_bits: bool = True,  # noqa: N802
           quantize_first: bool = True, quantize_last: bool = True, group_size: int = 8,
           min_bits: int = 1) -> Method:
    """The method `kind` names, from the keys every method shares (a shorthand; the config
    classes above are the real thing). Keys a method does not use are ignored."""
    values = {"init_bits": init_bits, "round_bits": round_bits, "quantize_first": quantize_first,
              "quantize_last": quantize_last, "group_size": group_size, "min_bits": min_bits}
    cls = _class_of(kind)
    return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


def from_header(scheme: dict) -> Method:
    """The method a file header's `scheme` describes (its keys checked, nothing else imported)."""
    if not isinstance(scheme, dict):
        raise TypeError("the scheme must be an object")
    unknown = sorted(set(scheme) - set(_HEADER_DEFAULTS) - set(_OPTIONAL_HEADER))
    if unknown:
        raise TypeError(f"unknown scheme keys {unknown}")
    return Scheme(**scheme)


def kind_of_target(target) -> str | None:
    """The kind of the method class a config's `_target_` string names, without importing it."""
    if not isinstance(target, str):
        return None
    name = target.rpartition(".")[2]
    kinds = {cls.__name__: kind for kind, cls in REGISTRY.items()}
    return kinds.get(name) or next((k for k in PLUGINS if name.lower() == k), None)
