"""The in-memory dataset and its batch iterator.

Every dataset decodes once into uint8 tensors (N, C, H, W) and stays in memory (on the GPU
when training there). Batches are drawn by indexing, normalised and augmented as whole-batch
tensor operations, airbench-style: no per-image Python, no DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scn.errors import DataError


@dataclass
class Augment:
    """Training-time augmentation, applied to whole batches."""

    crop_padding: int = 0  # random translation by up to this many pixels (zero padded)
    flip: bool = False  # random horizontal flip

    def __post_init__(self) -> None:
        from scn.errors import ConfigError

        if self.crop_padding < 0:
            raise ConfigError(f"dataset.augment.crop_padding={self.crop_padding} must be >= 0")


@dataclass
class ImageData:
    """A train/test split held as uint8 tensors, plus what is needed to normalise it."""

    name: str
    train_x: torch.Tensor  # uint8 (N, C, H, W)
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    augment: Augment = field(default_factory=Augment)
    mean: torch.Tensor | None = None  # per channel, in [0, 1] units; computed when None
    std: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.mean is None or self.std is None:
            self.mean, self.std = channel_stats(self.train_x)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to(self, device: torch.device | str) -> ImageData:
        move = {k: getattr(self, k).to(device) for k in ("train_x", "train_y", "test_x", "test_y")}
        return ImageData(self.name, classes=self.classes, augment=self.augment,
                         mean=self.mean.to(device), std=self.std.to(device), **move)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images to normalised floats (float32 unless torch's default dtype is wider)."""
        shape = (1, -1, 1, 1)
        return (x.to(torch.get_default_dtype()) / 255 - self.mean.view(shape)) / self.std.view(shape)


def existing_folder(root: str | Path, advice: str) -> Path:
    """`root` as a Path when it is a folder; otherwise a DataError naming it, then `advice`."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"dataset.root={root} does not exist or is not a folder. {advice}")
    return path


def channel_stats(x: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 images, in [0, 1] units (chunked: no float copy of all)."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    total_sq = torch.zeros(x.shape[1], dtype=torch.float64)
    for i in range(0, len(x), chunk):
        part = x[i:i + chunk].double().cpu() / 255
        total += part.sum(dim=(0, 2, 3))
        total_sq += (part**2).sum(dim=(0, 2, 3))
    n = len(x) * x.shape[2] * x.shape[3]
    mean = total / n
    std = (total_sq / n - mean**2).clamp(min=1e-12).sqrt()
    return mean.float().to(x.device), std.float().to(x.device)


def augment_batch(x: torch.Tensor, aug: Augment, generator: torch.Generator) -> torch.Tensor:
    """Random translation and flip of a whole uint8 batch, one draw per image."""
    n, _, h, w = x.shape
    if aug.flip:
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    p = aug.crop_padding
    if p:
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
        rows = (torch.arange(h, device=x.device).view(1, h) + dy.view(n, 1)).view(n, 1, h, 1)
        cols = (torch.arange(w, device=x.device).view(1, w) + dx.view(n, 1)).view(n, 1, 1, w)
        batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
        chans = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
        x = padded[batch, chans, rows, cols]
    return x


def batches(
    data: ImageData,
    split: str,
    batch_size: int,
    generator: torch.Generator | None = None,
    channels_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised float batches of `split` ("train": shuffled and augmented; "test": in order).

    Random draws come from `generator` (a CPU generator, so runs are reproducible on any
    device). The last partial training batch is dropped; every test image is used.
    """
    x, y = (data.train_x, data.train_y) if split == "train" else (data.test_x, data.test_y)
    train = split == "train"
    if train:
        order = torch.randperm(len(x), generator=generator).to(x.device)
        stop = len(x) - len(x) % batch_size if len(x) >= batch_size else len(x)
    else:
        order, stop = None, len(x)
    for i in range(0, stop, batch_size):
        if order is None:
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        else:
            idx = order[i:i + batch_size]
            xb, yb = x[idx], y[idx]
            xb = augment_batch(xb, data.augment, generator)
        xb = data.normalize(xb)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        yield xb, yb
