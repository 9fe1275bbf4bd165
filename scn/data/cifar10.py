"""CIFAR-10: torchvision's copy (found locally or downloaded), or an ImageFolder tree of it.

`root` may hold either kind, and the kind is detected:
- torchvision's python-version batches: `root/cifar-10-batches-py/` (or that folder itself),
  read through `torchvision.datasets.CIFAR10` (its `.data` array: no per-image Python);
- an ImageFolder tree `root/{train,test}/<class>/<image>` with CIFAR-10's ten classes, such
  as a JPEG re-encoding of it, read through `image_folder`
  (decoded once, then cached). Its ImageData is named "cifar10-jpeg", not "cifar10": it is
  not the original lossless pixels, and reports should say "CIFAR-10 (JPEG copy)".
"""

from __future__ import annotations

from pathlib import Path

import torch

from scn.data.core import Augment, ImageData, existing_folder
from scn.data.image_folder import image_files, image_folder
from scn.errors import ConfigError, DataError

CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck"]
BATCHES = "cifar-10-batches-py"
DEFAULT_ROOT = "data"
SOURCES = ("auto", "torchvision", "image_folder")
JPEG_NAME = "cifar10-jpeg"


def _is_torchvision_copy(root: Path) -> bool:
    return (root / BATCHES / "data_batch_1").is_file()


def _is_image_folder(root: Path) -> bool:
    return (root / "train").is_dir() or (root / "test").is_dir()


def _torchvision(root: Path, download: bool):
    """(tensors, classes) via torchvision, downloading into `root` if allowed; else the reason."""
    from torchvision.datasets import CIFAR10

    splits = {}
    for train in (True, False):
        try:  # a local copy first (one md5 pass), then the download (which checks it again)
            splits[train] = CIFAR10(str(root), train=train, download=False)
        except Exception as exc:
            if not download:
                return exc
            try:
                splits[train] = CIFAR10(str(root), train=train, download=True)
            except Exception as exc:  # offline, the mirror is down, a bad archive: caller explains
                return exc
    out = {}
    for train, ds in splits.items():
        split = "train" if train else "test"
        out[f"{split}_x"] = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC->NCHW
        out[f"{split}_y"] = torch.as_tensor(ds.targets, dtype=torch.int64)
    return out, list(splits[True].classes)


def _explain(where: str, download: bool, reason: Exception) -> DataError:
    why = f"{type(reason).__name__}: {str(reason).splitlines()[0] if str(reason) else ''}".rstrip(": ")
    return DataError(
        f"CIFAR-10 was not found {where}"
        f"{', and torchvision could not download it' if download else ' (download is off)'} "
        f"({why}). Either point dataset.root at an ImageFolder tree of it, e.g. "
        f"`dataset=cifar10 dataset.root=DIR` (DIR holding train/<class>/*.jpg and "
        f"test/<class>/*.jpg, the ten CIFAR-10 class folders), or at a folder holding "
        f"torchvision's {BATCHES}/; or run once with network access (dataset.download=true) "
        f"to let torchvision download it into dataset.root (./data when unset)."
    )


def cifar10(root: str | None = None, source: str = "auto", cache_dir: str | None = None,
            augment: Augment | None = None, download: bool = True) -> ImageData:
    """Load CIFAR-10 from `root` (either kind, detected), else ./data, else torchvision's download.

    source: "auto" (detect), "torchvision" (python batches, downloaded when missing) or
    "image_folder" (an ImageFolder tree at `root`, decoded once into `cache_dir`: None means
    $SCN_CACHE, else ~/.cache/scn). augment: None means CIFAR's usual crop 4 + flip.
    """
    if source not in SOURCES:
        raise ConfigError(f"dataset.source={source!r} must be one of {', '.join(SOURCES)}")
    augment = augment or Augment(crop_padding=4, flip=True)
    if root is not None:
        path = existing_folder(root, (
            f"Point it at a CIFAR-10 ImageFolder tree (DIR/train/<class>/*.jpg and "
            f"DIR/test/<class>/*.jpg) or at a folder holding torchvision's {BATCHES}/ (create "
            f"the folder first to download into it), or leave it unset to use ./data and "
            f"torchvision's download."))
        if path.name == BATCHES and (path / "data_batch_1").is_file():
            path = path.parent  # pointed at the batches folder itself: torchvision wants its parent
    else:
        path = Path(DEFAULT_ROOT)
        if source == "image_folder":
            raise ConfigError("dataset.source=image_folder needs dataset.root: the folder holding "
                              "train/<class>/ and test/<class>/")

    use_folder = source == "image_folder" or (
        source == "auto" and root is not None and _is_image_folder(path)
        and not _is_torchvision_copy(path))
    if use_folder:
        found = _class_folders(path / "train")
        if found is not None and found != CLASSES:  # checked before decoding a whole wrong tree
            raise DataError(
                f"{path} is an image folder tree, but its classes {found} are not "
                f"CIFAR-10's ({', '.join(CLASSES)}). Use `dataset=image_folder "
                f"dataset.root={path}` for other datasets."
            )
        data = image_folder(str(path), image_size=32, channels=3, cache_dir=cache_dir,
                            augment=augment)
        data.name = JPEG_NAME if _is_jpeg(path) else "cifar10"
        return data

    loaded = _torchvision(path, download)
    if isinstance(loaded, Exception):
        where = f"in {path.resolve()}" + (" (dataset.root)" if root is not None else
                                          " (./data; dataset.root is unset)")
        raise _explain(where, download, loaded)
    t, classes = loaded
    return ImageData("cifar10", t["train_x"], t["train_y"], t["test_x"], t["test_y"],
                     classes=classes, augment=augment)


def _class_folders(split_dir: Path) -> list[str] | None:
    """The class folder names of one split, as image_folder sees them; None if no such folder."""
    if not split_dir.is_dir():
        return None
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_jpeg(root: Path) -> bool:
    """Whether the (already validated) tree holds JPEGs: a lossy copy, to be named as such."""
    return image_files(root / "train" / _class_folders(root / "train")[0])[0].lower().endswith(
        (".jpg", ".jpeg"))
