"""A tiny generated dataset for tests: learnable, deterministic, no files needed."""

from __future__ import annotations

import torch

from scn.data.core import Augment, ImageData
from scn.errors import ConfigError


def synthetic(num_train: int = 512, num_test: int = 256, num_classes: int = 4,
              image_size: int = 28, channels: int = 1, seed: int = 0,
              augment: Augment | None = None) -> ImageData:
    """Images of noise plus a class-specific bright square: easy, but only for a real model."""
    if min(num_train, num_test, num_classes, image_size, channels) <= 0:
        raise ConfigError("dataset sizes (num_train, num_test, num_classes, image_size, "
                          "channels) must all be positive integers")
    gen = torch.Generator().manual_seed(seed)
    n = num_train + num_test
    y = torch.randint(0, num_classes, (n,), generator=gen)
    x = torch.randint(0, 96, (n, channels, image_size, image_size), generator=gen)
    size = max(image_size // 4, 2)
    for c in range(num_classes):  # one Python step per class, not per image
        r, col = divmod(c, 2)
        top, left = (r * size) % (image_size - size), (col * size * 2) % (image_size - size)
        x[y == c, :, top:top + size, left:left + size] += 150
    x = x.clamp(0, 255).to(torch.uint8)
    return ImageData(
        name="synthetic",
        train_x=x[:num_train], train_y=y[:num_train],
        test_x=x[num_train:], test_y=y[num_train:],
        classes=[f"class{c}" for c in range(num_classes)], augment=augment or Augment(),
    )
