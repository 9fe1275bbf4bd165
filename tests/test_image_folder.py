"""ImageFolder trees and CIFAR-10: decoding, the tensor cache, errors, configs. Small trees only."""

import importlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFIGS
from hydra import compose, initialize_config_dir
from PIL import Image

from scn.cli import build_experiment
from scn.data import Augment, cifar10, image_folder
from scn.data.core import augment_batch
from scn.errors import ConfigError, DataError

# the modules, not the same-named functions scn.data exports
image_folder_module = importlib.import_module("scn.data.image_folder")
CIFAR_CLASSES = importlib.import_module("scn.data.cifar10").CLASSES


def save(path: Path, mode: str, size: tuple[int, int], value: int = 0) -> Path:
    """An image of `size` (width, height) and `mode`, filled with `value` (+ a gradient)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    grad = (np.arange(w * h).reshape(h, w) % 7).astype(np.uint8)
    arr = np.clip(grad.astype(int) + value, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "L")
    if mode == "RGB":
        img = Image.merge("RGB", [img, img.point(lambda v: 255 - v), img])
    img.save(path)
    return path


def mixed_tree(root: Path) -> Path:
    """First image RGB 13x9; grayscale and other sizes mixed in; class 'b' has one image."""
    save(root / "train/a/0.png", "RGB", (13, 9), 10)
    save(root / "train/a/1.png", "L", (20, 20), 20)
    save(root / "train/a/sub/2.jpg", "RGB", (8, 5), 30)  # nested, like torchvision
    save(root / "train/b/0.png", "L", (13, 9), 40)
    save(root / "test/a/0.png", "L", (7, 11), 50)
    save(root / "test/b/0.png", "RGB", (13, 9), 60)
    save(root / "test/b/1.bmp", "RGB", (13, 9), 70)  # a format torchvision.io cannot read
    (root / "train/a/notes.txt").write_text("not an image: ignored")
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """Every test caches under tmp_path, never in ~/.cache/scn."""
    d = tmp_path / "cache"
    monkeypatch.setenv("SCN_CACHE", str(d))
    return d


def test_mixed_sizes_and_channels(tmp_path, cache):
    data = image_folder(str(mixed_tree(tmp_path / "tree")))
    assert data.classes == ["a", "b"]
    assert data.input_shape == (3, 9, 13)  # the first image decides
    assert data.train_x.dtype == torch.uint8 and data.test_x.shape == (3, 3, 9, 13)
    assert data.train_y.tolist() == [0, 0, 0, 1] and data.test_y.tolist() == [0, 1, 1]
    gray = data.train_x[3]  # a grayscale image converted to RGB: three equal channels
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert data.mean.shape == (3,) and (data.std > 0).all()
    assert data.name == "tree"
    assert len(list(cache.glob("*.safetensors"))) == 1  # $SCN_CACHE is honoured

    small = image_folder(str(tmp_path / "tree"), image_size=[6, 4], channels=1,
                         cache_dir=str(tmp_path / "other"))
    assert small.input_shape == (1, 6, 4) and small.mean.shape == (1,)


def test_first_grayscale_image_decides_one_channel(tmp_path, cache):
    save(tmp_path / "t/train/x/0.png", "L", (5, 5), 9)
    save(tmp_path / "t/train/x/1.png", "RGB", (5, 5), 9)
    save(tmp_path / "t/test/x/0.png", "RGB", (6, 6), 9)
    data = image_folder(str(tmp_path / "t"))
    assert data.input_shape == (1, 5, 5) and data.test_x.shape == (1, 1, 5, 5)


def test_cache_reused_then_invalidated(tmp_path, cache, monkeypatch):
    root = mixed_tree(tmp_path / "tree")
    first = image_folder(str(root))
    real = image_folder_module._decode_file
    calls = []

    def refuse(*a, **k):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(image_folder_module, "_decode_file", refuse)
    again = image_folder(str(root))
    for k in ("train_x", "train_y", "test_x", "test_y", "mean", "std"):
        assert torch.equal(getattr(first, k), getattr(again, k)), k

    def counting(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(image_folder_module, "_decode_file", counting)
    save(root / "train/b/1.png", "RGB", (13, 9), 80)  # a file added
    added = image_folder(str(root))
    assert calls and len(added.train_x) == 5 and added.train_y.tolist() == [0, 0, 0, 1, 1]

    calls.clear()
    image_folder(str(root))
    assert not calls  # the rebuilt cache is used
    target = root / "test/a/0.png"  # a file rewritten in place (same name, same size)
    save(target, "L", (7, 11), 200)
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = image_folder(str(root))
    assert calls and changed.test_x[0].float().mean() > added.test_x[0].float().mean() + 100
    assert len(list(cache.glob("*.safetensors"))) == 1  # replaced, not accumulated


def test_damaged_cache_is_rebuilt(tmp_path, cache):
    root = mixed_tree(tmp_path / "tree")
    first = image_folder(str(root))
    (file,) = cache.glob("*.safetensors")
    file.write_bytes(file.read_bytes()[:100])
    with pytest.warns(UserWarning, match="unreadable dataset cache"):
        again = image_folder(str(root))
    assert torch.equal(first.train_x, again.train_x)


def test_errors_name_the_path(tmp_path, cache):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=str(missing)):
        image_folder(str(missing))

    save(tmp_path / "no_test/train/a/0.png", "L", (4, 4))
    with pytest.raises(DataError, match=r"no_test has no test/ folder"):
        image_folder(str(tmp_path / "no_test"))

    root = mixed_tree(tmp_path / "empty_class")
    (root / "test/c").mkdir()
    (root / "train/c").mkdir()
    (root / "train/c/readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=str(root / "train/c")):
        image_folder(str(root))

    root = mixed_tree(tmp_path / "differ")
    save(root / "train/c/0.png", "L", (4, 4))
    with pytest.raises(DataError, match=r"differ.*only in train/: \['c'\]"):
        image_folder(str(root))

    root = mixed_tree(tmp_path / "corrupt")
    bad = root / "test/b/2.jpg"
    bad.write_bytes((root / "train/a/sub/2.jpg").read_bytes()[:60])  # truncated JPEG
    with pytest.raises(DataError, match=str(bad)):
        image_folder(str(root))
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=str(bad)):
        image_folder(str(root))
    bad.unlink()
    bad.symlink_to(root / "gone.jpg")  # a broken link
    with pytest.raises(DataError, match=str(bad)):
        image_folder(str(root))


@pytest.mark.parametrize("kwargs", [{"image_size": 0}, {"image_size": [3, 4, 5]},
                                    {"channels": 2}, {"image_size": "big"}])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ConfigError):
        image_folder(str(tmp_path), **kwargs)


def test_augmented_batches_keep_labels(tmp_path, cache):
    """Each image is one brightness that encodes its label: augmentation must keep it aligned."""
    root = tmp_path / "levels"
    for split, n in (("train", 6), ("test", 1)):
        for label in range(5):
            for i in range(n):
                d = root / split / f"c{label}"
                d.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (16, 16), (40 * label + 20,) * 3).save(d / f"{i}.png")
    data = image_folder(str(root))
    gen = torch.Generator().manual_seed(0)
    x = augment_batch(data.train_x, Augment(crop_padding=4, flip=True), gen)
    assert not torch.equal(x, data.train_x)  # something moved (zero padding shows)
    centre = x[:, 0, 8, 8].long()
    assert torch.equal((centre - 20) // 40, data.train_y)


def cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def cifar_tree(root: Path) -> Path:
    """One 32x32 JPEG per CIFAR-10 class and split."""
    for split in ("train", "test"):
        for c, name in enumerate(CIFAR_CLASSES):
            (root / split / name).mkdir(parents=True)
            Image.new("RGB", (32, 32), (c * 20, 100, 50)).save(root / split / name / "0000.jpg")
    return root


def test_cifar10_config_composes():
    c = cfg("dataset=cifar10")
    assert c.dataset._target_ == "scn.data.cifar10" and c.dataset.root is None
    assert c.dataset.augment.crop_padding == 4 and c.dataset.augment.flip is True


def test_image_folder_config_needs_root():
    c = cfg("dataset=image_folder")
    assert c.dataset._target_ == "scn.data.image_folder"
    with pytest.raises(Exception, match="dataset.root"):
        build_experiment(c)


def test_cifar10_config_loads_an_image_folder_tree(tmp_path):
    root = cifar_tree(tmp_path / "cifar10-jpeg")
    exp = build_experiment(cfg("dataset=cifar10", f"dataset.root={root}",
                               f"dataset.cache_dir={tmp_path / 'cache'}"))
    assert exp.data.name == "cifar10-jpeg" and exp.data.classes == CIFAR_CLASSES
    assert exp.data.input_shape == (3, 32, 32) and exp.data.train_y.tolist() == list(range(10))
    assert exp.data.augment == Augment(crop_padding=4, flip=True)
    assert list((tmp_path / "cache").glob("cifar10-jpeg-*.safetensors"))


def test_cifar10_rejects_other_class_lists(tmp_path, cache):
    save(tmp_path / "t/train/cat/0.png", "RGB", (32, 32))
    save(tmp_path / "t/test/cat/0.png", "RGB", (32, 32))
    with pytest.raises(DataError, match="dataset=image_folder"):
        cifar10(str(tmp_path / "t"))


class FakeCIFAR10:
    """Stands in for torchvision.datasets.CIFAR10 (the real one checks md5s of the real files)."""

    calls: list = []
    online = False

    def __init__(self, root, train=True, download=False):
        FakeCIFAR10.calls.append((root, train, download))
        have = (Path(root) / "cifar-10-batches-py" / "data_batch_1").is_file()
        if not have and not (download and self.online):
            raise RuntimeError("Dataset not found or corrupted.")
        n = 6 if train else 4
        self.data = np.full((n, 32, 32, 3), 7, dtype=np.uint8)
        self.data[:, 0, 0, :] = [1, 2, 3]
        self.targets = list(range(n))
        self.classes = list(CIFAR_CLASSES)


@pytest.fixture
def fake_torchvision(monkeypatch):
    import torchvision.datasets

    FakeCIFAR10.calls = []
    FakeCIFAR10.online = False
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    return FakeCIFAR10


def test_cifar10_torchvision_copy_detected(tmp_path, fake_torchvision, cache):
    batches = tmp_path / "tv" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    (batches / "data_batch_1").write_bytes(b"")
    for root in (tmp_path / "tv", batches):  # the parent, or the batches folder itself
        data = cifar10(str(root))
        assert data.name == "cifar10" and data.input_shape == (3, 32, 32)
        assert data.train_x[0, :, 0, 0].tolist() == [1, 2, 3]  # NHWC -> NCHW
        assert data.train_y.dtype == torch.int64 and len(data.test_y) == 4
        assert fake_torchvision.calls[-1][0] == str(tmp_path / "tv")


def test_cifar10_unset_root_explains_both_options(tmp_path, fake_torchvision, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"could not download it \(RuntimeError: .*dataset.root=DIR.*network"):
        cifar10()
    assert fake_torchvision.calls == [("data", True, False), ("data", True, True)]  # local, then fetch
    fake_torchvision.online = True
    assert cifar10().name == "cifar10"  # online: torchvision downloads into ./data


def test_cifar10_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="source"):
        cifar10(str(tmp_path), source="hdf5")
    with pytest.raises(DataError, match="does not exist"):
        cifar10(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="needs dataset.root"):
        cifar10(source="image_folder")
