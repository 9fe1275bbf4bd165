"""The CIFAR-10 experiments: configs compose, and the CPU recipe runs end to end on a tiny tree."""

import json
import subprocess

from conftest import SCN_TRAIN
from test_image_folder import cfg, cifar_tree

from scn.models import ResNet9


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
