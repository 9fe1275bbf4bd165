"""Any train/test ImageFolder tree, decoded once into a uint8 tensor cache on disk.

Layout (torchvision's ImageFolder, one tree per split):

    root/train/<class>/**/<image>    root/test/<class>/**/<image>

Class names are the sorted class folder names (folders starting with "." are skipped), the
same in both splits. Channels and size come from the first training image unless given;
every other image is converted to that channel count (grayscale <-> RGB) and resized to it.

The first load decodes every file and writes `<cache_dir>/<name>-<key>.safetensors`
(uint8 images, int64 labels, the per-channel mean/std; no pickle), atomically. Later loads
read it back when the source is unchanged: the cache records a fingerprint of the file list
(relative paths, sizes, mtimes), recomputed from a directory scan on every load, and any
added, removed or rewritten file triggers a fresh decode that replaces the stale cache.

Decoding is sequential, torchvision.io first (JPEG/PNG/WebP), PIL for other formats and once
torchvision drops its (deprecated since 0.29) image decoders. Measured
on 3,000 CIFAR-10 JPEGs on the 2-core box (busy with other work): torchvision.io 35 us/image
vs PIL 68 us/image; a thread pool made either slower (46-108 us/image with 2-4 threads),
since per-image work is too small for threads to pay off on 2 cores. The whole 60,000-image
CIFAR-10 JPEG copy: 15 s the first time (9 s decoding cold files), 0.3 s from the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from scn.data.core import Augment, ImageData, existing_folder
from scn.errors import ConfigError, DataError

# torchvision.datasets.folder.IMG_EXTENSIONS
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_TORCHVISION_IO = (".jpg", ".jpeg", ".png", ".webp")  # what torchvision.io.decode_image reads
CACHE_VERSION = "1"
SPLITS = ("train", "test")


def default_cache_dir() -> Path:
    """$SCN_CACHE when set, else ~/.cache/scn."""
    env = os.environ.get("SCN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "scn"


# ----------------------------------------------------------------------------- scanning

def image_files(class_dir: str | os.PathLike) -> list[str]:
    """Image files under one class folder, recursively, in torchvision's (sorted walk) order.

    Plain strings, not Paths: a CIFAR-sized tree has 60,000 of them, and every cached load scans
    the tree (pathlib would triple the time).
    """
    found = []
    for dirpath, _, filenames in sorted(os.walk(class_dir, followlinks=True)):
        found.extend(os.path.join(dirpath, name) for name in sorted(filenames)
                     if name.lower().endswith(IMG_EXTENSIONS))
    return found


def scan(root: Path) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """Check the layout and list (file, label) per split. Raises DataError on a bad tree."""
    classes: dict[str, list[str]] = {}
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(
                f"{root} has no {split}/ folder. An image folder dataset needs "
                f"{root}/train/<class>/<images> and {root}/test/<class>/<images>; add the "
                f"missing split, or point dataset.root at the folder that holds both."
            )
        classes[split] = sorted(e.name for e in os.scandir(split_dir)
                                if e.is_dir() and not e.name.startswith("."))
        if not classes[split]:
            raise DataError(
                f"{split_dir} holds no class folders. Put each class's images in "
                f"{split_dir}/<class name>/ (the folder name is the label)."
            )
    if classes["train"] != classes["test"]:
        only_train = sorted(set(classes["train"]) - set(classes["test"]))
        only_test = sorted(set(classes["test"]) - set(classes["train"]))
        raise DataError(
            f"the train and test class folders under {root} differ (only in train/: "
            f"{only_train or 'none'}; only in test/: {only_test or 'none'}). Both splits need "
            f"the same class folders, so that labels mean the same thing in both; add or "
            f"remove folders until the lists match."
        )
    names = classes["train"]
    files: dict[str, list[tuple[str, int]]] = {}
    for split in SPLITS:
        files[split] = []
        for label, name in enumerate(names):
            found = image_files(root / split / name)
            if not found:
                raise DataError(
                    f"the class folder {root / split / name} holds no images (looked for "
                    f"{', '.join(IMG_EXTENSIONS)}). Add its images, or remove the class "
                    f"from both train/ and test/."
                )
            files[split].extend((p, label) for p in found)
    return names, files


def fingerprint(root: Path, files: dict[str, list[tuple[str, int]]]) -> str:
    """A hash of every file's relative path, label, size and mtime: changes when the source does."""
    h = hashlib.sha256()
    skip = len(str(root)) + 1
    for split in SPLITS:
        for path, label in files[split]:
            try:
                st = os.stat(path)
            except OSError as exc:  # a broken link, or a file deleted while we look
                raise DataError(f"cannot read the image {path} ({exc.strerror}); fix or remove it "
                                f"and run again.") from None
            h.update(f"{path[skip:]}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- decoding

def _torchvision_io():
    """torchvision.io's decoder, or None where this torchvision no longer has it."""
    try:
        from torchvision.io import ImageReadMode, decode_image, read_file
    except ImportError:
        return None
    # deprecated since torchvision 0.29 in favour of TorchCodec (see _quiet); PIL takes over
    # once it is gone
    modes = {None: ImageReadMode.UNCHANGED, 1: ImageReadMode.GRAY, 3: ImageReadMode.RGB}
    return lambda path, channels: decode_image(read_file(str(path)), mode=modes[channels])


_TVIO = _torchvision_io()


@contextlib.contextmanager
def _quiet():
    """Silence torchvision.io's per-call deprecation warning while decoding."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities "
                                "of TorchVision are deprecated", category=DeprecationWarning)
        yield


def _decode_file(path: str, channels: int | None) -> torch.Tensor:
    """One image as uint8 (C, H, W), converted to `channels` (1 or 3; None: as stored, 1 or 3)."""
    reason = None
    if _TVIO is not None and path.lower().endswith(_TORCHVISION_IO):
        try:
            x = _TVIO(path, channels)
            if x.dtype != torch.uint8:  # 16-bit PNG
                x = (x.to(torch.int32) >> 8).to(torch.uint8)
            if channels is None:  # drop alpha: 2 -> 1 (gray), 4 -> 3 (RGB)
                x = x[:1] if x.shape[0] <= 2 else x[:3]
            return x
        except RuntimeError as exc:  # let PIL try (and word the error if it fails too)
            reason = str(exc).splitlines()[-1]
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if channels is None:
                channels = 1 if im.mode in ("1", "L", "LA", "La", "I", "I;16", "F") else 3
            if im.mode.startswith("I;16") or im.mode == "I":  # 16-bit: keep the high byte
                im = Image.fromarray((np.asarray(im, dtype=np.int64).clip(0, 65535) >> 8)
                                     .astype(np.uint8))
            im = im.convert("L" if channels == 1 else "RGB")
            x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
            return x.view(im.height, im.width, channels).permute(2, 0, 1).contiguous()
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"cannot read the image {path}: {reason or exc}. It is corrupt, truncated or not an "
            f"image; delete or replace it and run again."
        ) from None


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    from torchvision.transforms.v2.functional import resize

    return resize(x, list(size), antialias=True)


def decode(files: list[tuple[str, int]], size: tuple[int, int], channels: int,
           progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode (file, label) pairs into uint8 (N, C, H, W) images and int64 labels."""
    x = torch.empty((len(files), channels, *size), dtype=torch.uint8)
    y = torch.tensor([label for _, label in files], dtype=torch.int64)
    for i, (path, _) in enumerate(files):
        img = _decode_file(path, channels)
        if tuple(img.shape[1:]) != size:
            img = _resize(img, size)
        x[i] = img
        if progress is not None:
            progress.update(1)
    return x, y


# ----------------------------------------------------------------------------- the cache

def _cache_file(cache_dir: Path, root: Path, size: tuple[int, int] | None,
                channels: int | None) -> Path:
    key = hashlib.sha256(f"{root}|{size}|{channels}|v{CACHE_VERSION}".encode()).hexdigest()[:16]
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in root.name) or "root"
    return cache_dir / f"{slug}-{key}.safetensors"


_KEYS = ("train_x", "train_y", "test_x", "test_y", "mean", "std")


def _read_cache(path: Path, fp: str) -> dict | None:
    """The cached tensors and class list when `path` is a valid cache of this source, else None."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("version") != CACHE_VERSION or meta.get("fingerprint") != fp:
                return None  # the source changed: decode again
            out = {k: f.get_tensor(k) for k in _KEYS}
        out["classes"] = json.loads(meta["classes"])
        ok = (out["train_x"].dtype == torch.uint8 and out["train_x"].ndim == 4
              and len(out["train_x"]) == len(out["train_y"])
              and len(out["test_x"]) == len(out["test_y"]))
        if not ok:
            raise ValueError("tensors have unexpected shapes")
        return out
    except Exception as exc:  # a damaged cache is rebuilt, never trusted
        warnings.warn(f"ignoring the unreadable dataset cache {path} ({exc}); decoding again",
                      stacklevel=3)
        return None


def _write_cache(path: Path, data: ImageData, meta: dict[str, str]) -> bool:
    from safetensors.torch import save_file

    from scn.io import atomic_write

    tensors = {k: getattr(data, k).contiguous() for k in _KEYS}
    try:
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        return True
    except OSError as exc:  # a read-only cache folder slows the next run, it breaks nothing
        warnings.warn(f"could not write the dataset cache {path} ({exc}); set dataset.cache_dir "
                      f"or SCN_CACHE to a writable folder to skip decoding next time", stacklevel=3)
        return False


# ----------------------------------------------------------------------------- the dataset

def _parse_size(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        size = (image_size, image_size)
    elif isinstance(image_size, Sequence) and not isinstance(image_size, str):  # also ListConfig
        size = tuple(image_size)
    else:
        size = ()
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                 for s in size):
        raise ConfigError(f"dataset.image_size={image_size!r} must be a positive integer or a "
                          f"[height, width] pair of them (or null: the first image's size)")
    return size


def image_folder(root: str, image_size: int | Sequence[int] | None = None,
                 channels: int | None = None, cache_dir: str | None = None,
                 augment: Augment | None = None, name: str | None = None) -> ImageData:
    """Load `root`/{train,test}/<class>/* as an ImageData, through the decoded-tensor cache.

    image_size: output size, an int (square) or [height, width]; None: the first training
    image's. channels: 1 (grayscale) or 3 (RGB); None: the first training image's.
    cache_dir: where the decoded tensors are kept; None: $SCN_CACHE, else ~/.cache/scn.
    name: the dataset's name in reports; None: the root folder's name.
    """
    size = _parse_size(image_size)
    if channels is not None and channels not in (1, 3):
        raise ConfigError(f"dataset.channels={channels!r} must be 1 (grayscale), 3 (RGB) or "
                          f"null (the first image's)")
    if root is None or str(root) == "":
        raise ConfigError("dataset.root is not set: point it at a folder holding "
                          "train/<class>/<images> and test/<class>/<images>")
    path = existing_folder(root, "Point it at a folder holding train/<class>/<images> and "
                           "test/<class>/<images> (torchvision's ImageFolder layout).").resolve()
    classes, files = scan(path)
    fp = fingerprint(path, files)
    cache = _cache_file(Path(cache_dir).expanduser() if cache_dir else default_cache_dir(),
                        path, size, channels)
    name = name or path.name
    augment = augment or Augment()

    cached = _read_cache(cache, fp)
    if cached is not None and cached["classes"] == classes:
        return ImageData(name, cached["train_x"], cached["train_y"], cached["test_x"],
                         cached["test_y"], classes=classes, augment=augment,
                         mean=cached["mean"], std=cached["std"])

    from tqdm import tqdm

    start = time.perf_counter()
    total = sum(len(v) for v in files.values())
    with _quiet(), tqdm(total=total, desc=f"scn: decoding {path.name} once", unit="img",
                        file=sys.stderr, mininterval=1.0, dynamic_ncols=True) as bar:
        first = _decode_file(files["train"][0][0], channels)
        channels = first.shape[0]
        size = size or tuple(first.shape[1:])
        train_x, train_y = decode(files["train"], size, channels, bar)
        test_x, test_y = decode(files["test"], size, channels, bar)
    data = ImageData(name, train_x, train_y, test_x, test_y, classes=classes, augment=augment)
    meta = {"version": CACHE_VERSION, "fingerprint": fp, "source": str(path),
            "classes": json.dumps(classes), "image_size": json.dumps(list(size)),
            "channels": str(channels)}
    if _write_cache(cache, data, meta):
        print(f"scn: decoded {total} images from {path} in {time.perf_counter() - start:.1f}s; "
              f"cached as {cache} ({cache.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)
    return data
