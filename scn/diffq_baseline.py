"""DiffQ (Défossez, Adi and Synnaeve, 2022) as a baseline scheme, through the `diffq` package.

DiffQ learns a bit depth per group of weights with pseudo-quantization noise and penalises the
model's size in megabytes; at evaluation it quantizes for real. scn uses the package as it is
(an optional extra: `pip install '.[diffq]'`; its licence is CC-BY-NC, so it is never
vendored), on the same model, data, optimizer and schedule as every other scheme:

- every Conv2d/Linear weight is quantized, whatever its size (DiffQ's default skips tensors
  under 10 kB, which would leave most of a small CNN in float and make DiffQ look worse);
  biases and BatchNorm stay float, as in scn;
- the size term is DiffQ's own differentiable `model_size()` (MB), weighted by gamma;
- sizes are reported twice: in scn's accounting (each group's rounded bits, plus DiffQ's
  per-tensor scales and per-group bit depths as metadata, plus every float tensor at its width,
  over the same reference count), and as DiffQ's own `true_model_size()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from scn.errors import ConfigError
from scn.methods import Method, SizeTerm, register
from scn.size import SizeReport, reference_of


def _diffq():
    try:
        import diffq
    except ImportError:
        raise ConfigError(
            "quant=diffq needs the optional `diffq` package, which is not installed. Install "
            "the extra with `pip install -e '.[diffq]'` (or `pip install diffq`), or pick "
            "another scheme: quant=self_compress, fixed or none."
        ) from None
    return diffq


def _weight_names(model: nn.Module) -> set[str]:
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@register
@dataclass
class DiffQ(Method):
    """The DiffQ baseline: layers stay float for DiffQ to quantize (`init_bits` and
    `group_size` are DiffQ's: its initial bits, and the weights sharing one learned bit depth)."""

    kind: ClassVar[str] = "diffq"
    packs: ClassVar[bool] = False  # per-group bit depths do not fit .scn; no training checkpoints
    channels_last: ClassVar[bool] = False  # DiffQ views parameters as flat groups
    init_bits: float = 8  # DiffQ's initial bits (its bits stay in [2, 15])
    group_size: int = 8  # weights sharing one learned bit depth

    def __post_init__(self) -> None:
        if not (2 < self.init_bits < 15 and self.group_size >= 1):
            raise ConfigError(
                f"quant.init_bits={self.init_bits}, quant.group_size={self.group_size}: DiffQ "
                "needs an initial bit depth strictly between 2 and 15 and a group size >= 1.")

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> SizeTerm:
        return DiffQSize(model, optimizer, self.group_size, self.init_bits)


class DiffQSize(SizeTerm):
    """DiffQ attached to a float-converted model and its optimizer (in that order, as DiffQ asks)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, group_size: int = 8,
                 init_bits: float = 8.0, lr: float = 1e-3) -> None:
        super().__init__(model, learns_bits=False)
        diffq = _diffq()
        weights = _weight_names(model)
        others = [f"{mod}.{name}" if mod else name for mod, m in model.named_modules()
                  for name, _ in m.named_parameters(recurse=False)
                  if (f"{mod}.{name}" if mod else name) not in weights]
        for name, p in model.named_parameters():
            if name in weights and p.numel() % group_size:
                raise ConfigError(f"quant.group_size={group_size} must divide every weight tensor; "
                                  f"{name} has {p.numel()} elements (try 4, 2 or 1).")
        self.quantizer = diffq.DiffQuantizer(model, min_size=0.0, group_size=group_size,
                                             init_bits=init_bits, exclude=others)
        self.quantizer.setup_optimizer(optimizer, lr=lr)

    def term(self) -> torch.Tensor:
        """DiffQ's differentiable size estimate, in megabytes."""
        return self.quantizer.model_size()

    def row(self) -> dict:
        return {"diffq_true_bytes": self.true_bytes()}  # DiffQ's own measure of its size

    def true_bytes(self) -> float:
        return self.quantizer.true_model_size() * 2**20

    @torch.no_grad()
    def report(self) -> SizeReport:
        """The model's size in scn's accounting, with DiffQ's rounded bits per group."""
        q = self.quantizer
        ref = reference_of(self.model)
        weight_bits = meta_bits = 0
        quantized = set()
        for qp in q._qparams:
            if qp.other is not None:
                continue
            bits = (q.extra_bits + q._get_bits(qp.logit)).round().clamp(1, 15)
            weight_bits += int(q.group_size * bits.sum())
            # DiffQ stores a min and max (2 x float32) per tensor and each group's bit depth.
            bits_bits = math.ceil(math.log2(1 + (bits.max().item() - q.min_bits)))
            meta_bits += 2 * 32 + 8 + bits_bits * bits.numel()
            quantized.add(id(qp.param))
        float_bits = 0
        for key, t in self.model.state_dict(keep_vars=True).items():
            if key.endswith(("num_batches_tracked", "in_alive", "_diffq")) or id(t) in quantized:
                continue
            float_bits += t.numel() * t.element_size() * 8
        params = sum(p.numel() for n, p in self.model.named_parameters() if not n.endswith("_diffq"))
        return SizeReport(
            weight_bits=weight_bits, float_bits=float_bits, meta_bits=meta_bits,
            reference_scalars=ref.scalars, weights_stored=sum(
                p.numel() for n, p in self.model.named_parameters() if n in _weight_names(self.model)),
            reference_weights=ref.weights, param_count=params,
            channels={n: (m.weight.shape[0], ref.out_channels.get(n, m.weight.shape[0]))
                      for n, m in self.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))},
        )

    def finish(self) -> dict:
        """Leave the model holding its quantized weights, with DiffQ's hooks and logits gone;
        DiffQ's own size goes into the summary."""
        true_bytes = self.true_bytes()
        self.quantizer.quantize()
        self.quantizer.detach()
        return {"diffq_true_bytes": true_bytes}
