"""Fashion-MNIST: the original IDX files, found locally or downloaded by torchvision."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from scn.data.core import Augment, ImageData
from scn.errors import DataError

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): big-endian dims, then unsigned bytes."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes; delete it and fetch it again")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    body = 4 + 4 * ndim
    if len(raw) - body != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: expected {int(np.prod(dims))} bytes of data, "
                        f"found {len(raw) - body}; delete it and fetch it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=body).reshape(dims)


def _find(folder: Path, stem: str) -> Path | None:
    for sub in ("", "FashionMNIST/raw", "raw"):
        for suffix in ("", ".gz"):
            p = folder / sub / (stem + suffix)
            if p.is_file():
                return p
    return None


def _load_from(folder: Path) -> dict[str, np.ndarray] | None:
    paths = {k: _find(folder, stem) for k, stem in _FILES.items()}
    if any(p is None for p in paths.values()):
        return None
    return {k: read_idx(p) for k, p in paths.items()}


def _download(root: Path) -> dict[str, np.ndarray] | None:
    try:
        from torchvision.datasets import FashionMNIST

        for train in (True, False):
            FashionMNIST(str(root), train=train, download=True)
    except Exception:  # offline, or the mirror is down: the caller explains what to do
        return None
    return _load_from(root)


DEFAULT_ROOT = "data"


def fashion_mnist(root: str | None = None, download: bool = True,
                  augment: Augment | None = None) -> ImageData:
    """Load Fashion-MNIST from `root`, else from Debian's package, else torchvision's download.

    A `root` that is given but does not exist is an error (a mistyped path should not
    silently fall back to another copy); unset, downloads go to ./data.
    """
    if root is not None and not Path(root).expanduser().is_dir():
        raise DataError(
            f"dataset.root={root} does not exist. Point it at a folder holding the Fashion-MNIST "
            "IDX files, or leave it unset to use /usr/share/datasets/fashion-mnist (install with "
            "`sudo apt-get install -y dataset-fashion-mnist`) or torchvision's download."
        )
    root_path = Path(root or DEFAULT_ROOT).expanduser()
    arrays = _load_from(root_path) or _load_from(SYSTEM_DIR)
    if arrays is None and download:
        arrays = _download(root_path)
    if arrays is None:
        raise DataError(
            f"Fashion-MNIST was not found in {root_path} (dataset.root) nor in {SYSTEM_DIR}, and "
            f"{'torchvision could not download it' if download else 'download is off'}. Install "
            "it with `sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist`, or "
            "put the four IDX files (train-images-idx3-ubyte[.gz] etc.) in dataset.root, or run "
            "once with network access to let torchvision download them."
        )
    t = {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}
    return ImageData(
        name="fashion_mnist",
        train_x=t["train_x"].unsqueeze(1), train_y=t["train_y"].long(),
        test_x=t["test_x"].unsqueeze(1), test_y=t["test_y"].long(),
        classes=list(CLASSES), augment=augment or Augment(),
    )
