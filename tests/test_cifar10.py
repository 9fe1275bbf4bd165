"""The CIFAR-10 experiments: configs compose, and the CPU recipe runs end to end on a tiny tree."""

import json
import subprocess

import pytest
import torch
from conftest import SCN_TRAIN
from test_image_folder import cfg, cifar_tree

from scn import format as fmt
from scn.methods import Scheme, quantize_
from scn.models import ResNet9, build


def test_experiments_compose_to_resnet9():
    full = cfg("+experiment=cifar10_resnet")
    cpu = cfg("+experiment=cifar10_resnet_cpu")
    assert full.model.name == cpu.model.name == "ResNet9"
    assert full.dataset._target_ == cpu.dataset._target_ == "scn.data.cifar10"
    assert cpu.model.width < full.model.width and cpu.trainer.max_epochs < full.trainer.max_epochs
    for variant, target in (("quant=none", "Float"), ("quant=fixed", "FixedBits")):
        assert cfg("+experiment=cifar10_resnet_cpu", variant).quant._target_ == f"scn.methods.{target}"


def test_cpu_recipe_two_steps_on_a_tiny_tree(tmp_path):
    root = cifar_tree(tmp_path / "cifar10-jpeg")
    out = tmp_path / "run"
    proc = subprocess.run(
        [str(SCN_TRAIN), "+experiment=cifar10_resnet_cpu", f"dataset.root={root}",
         f"dataset.cache_dir={tmp_path / 'cache'}", "trainer.batch_size=4", "trainer.max_steps=2",
         "trainer.progress=false", f"hydra.run.dir={out}"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 2
    assert summary["dataset_name"] == "cifar10-jpeg"
    assert summary["images_per_s"] > 0
    assert summary["param_count"] <= sum(p.numel() for p in ResNet9(width=16).parameters())
    assert (out / "model.scn").stat().st_size < summary["float32_bytes"]


def test_resnet9_channel_counts_build_and_reload_from_the_file(tmp_path):
    channels = [8, 16, 5, 24, 40, 12]  # prep, layer1, its hidden, layer2, layer3, its hidden
    model = quantize_(build("ResNet9", num_classes=10, width=16, channels=channels),
                      Scheme(init_bits=4)).eval()
    assert model.layer1[-1].body[0].out_channels == 5 and model.layer3[-1].body[3].in_channels == 12
    assert model.head.in_features == 40
    fmt.save(model, tmp_path / "m.scn", {"name": "synthetic", "classes": list("abcdefghij"),
                                         "input_shape": [3, 32, 32]})
    loaded, _ = fmt.load(tmp_path / "m.scn")
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(loaded.eval()(x), model(x))
    with pytest.raises(ValueError, match="must be six positive integers"):
        ResNet9(channels=[8, 16, 32])
