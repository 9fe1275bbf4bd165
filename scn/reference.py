"""The size reference: the original float model's size, the denominator of every ratio.

Recorded by `scn.quantize_` before any channel is removed, stored in every file's header, so
bits per weight and weights left are always measured against the same model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

FREE_SUFFIXES = ("in_alive", "num_batches_tracked")  # never stored, so never counted


@dataclass(frozen=True)
class Reference:
    """The original float model's size, the denominator of every ratio reported."""

    scalars: int  # every parameter and float buffer element
    weights: int  # elements of Conv2d/Linear weights only
    out_channels: dict[str, int] = field(default_factory=dict)  # per weight layer

    def __post_init__(self) -> None:
        """A reference read from a file must make every ratio a finite number."""
        if not isinstance(self.out_channels, dict):
            raise TypeError("the size reference's out_channels must be an object")
        counts = [self.scalars, self.weights, *self.out_channels.values()]
        if not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in counts):
            raise ValueError("the size reference's counts must be positive integers")
        if not all(isinstance(k, str) for k in self.out_channels):
            raise ValueError("the size reference names its layers with strings")

    @classmethod
    def of(cls, model: nn.Module) -> Reference:
        state = {k: v for k, v in model.state_dict().items() if not k.endswith(FREE_SUFFIXES)}
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        return cls(
            scalars=sum(v.numel() for v in state.values() if v.is_floating_point()),
            weights=sum(m.weight.numel() for _, m in layers),
            out_channels={n: m.weight.shape[0] for n, m in layers},
        )


def reference_of(model: nn.Module) -> Reference:
    """The reference recorded by `scn.quantize_` (computed before any channel was removed)."""
    ref = getattr(model, "scn_reference", None)
    if ref is None:
        raise ValueError("this model was not converted with scn.quantize_; no size reference")
    return ref
