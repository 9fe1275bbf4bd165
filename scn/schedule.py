"""Size-loss weight schedules: gamma as a function of training progress.

Each schedule is a small callable `schedule(step, total_steps) -> gamma`. Ramping gamma up
from 0 lets the weights learn something before the size term starts to push bit depths
down; a channel whose bit depth reaches 0 is gone for good, so early deaths are costly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scn.errors import ConfigError


def _check(gamma: float, **fractions: float) -> None:
    if not isinstance(gamma, (int, float)) or gamma < 0 or not math.isfinite(gamma):
        raise ConfigError(
            f"size_loss.gamma={gamma!r} is invalid: the size-loss weight must be a finite "
            "number >= 0 (0 turns the size term off; typical values are 0.02 to 0.5)."
        )
    for key, value in fractions.items():
        if not 0 <= value <= 1:
            raise ConfigError(f"size_loss.{key}={value!r} is out of range: it is a fraction "
                              "of training and must lie in [0, 1].")


@dataclass
class Constant:
    """gamma throughout."""

    gamma: float = 0.01

    def __post_init__(self) -> None:
        _check(self.gamma)

    def __call__(self, step: int, total_steps: int) -> float:
        return self.gamma


@dataclass
class LinearWarmup:
    """0 rising linearly to gamma over the first `warmup` fraction of training, then gamma."""

    gamma: float = 0.1
    warmup: float = 0.2

    def __post_init__(self) -> None:
        _check(self.gamma, warmup=self.warmup)

    def __call__(self, step: int, total_steps: int) -> float:
        ramp = self.warmup * total_steps
        return self.gamma * min(1.0, step / ramp) if ramp > 0 else self.gamma


@dataclass
class Cosine:
    """Linear warm-up to gamma, then cosine decay to `final` x gamma at the end.

    High pressure while the network is plastic, less at the end so accuracy can recover
    at the sizes reached (dead channels stay dead).
    """

    gamma: float = 0.01
    warmup: float = 0.1
    final: float = 0.0

    def __post_init__(self) -> None:
        _check(self.gamma, warmup=self.warmup, final=self.final)

    def __call__(self, step: int, total_steps: int) -> float:
        ramp = self.warmup * total_steps
        if step < ramp:
            return self.gamma * step / ramp
        progress = (step - ramp) / max(total_steps - ramp, 1)
        shape = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return self.gamma * (self.final + (1 - self.final) * shape)
