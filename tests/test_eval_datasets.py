"""scn-eval on every dataset scn trains on: the accuracy it prints is the training run's, exactly."""

import json
from pathlib import Path

import pytest
from PIL import Image
from test_image_folder import cfg, cifar_tree, fake_torchvision  # noqa: F401

from scn import eval_cli
from scn import experiment as scn_experiment
from scn.cli import build_experiment


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCN_CACHE", str(tmp_path / "cache"))  # scn-eval's decoded folders


def digits_tree(root: Path) -> Path:
    """A grey-scale 12x12 image folder of three classes ('bars' at three heights)."""
    for split, count in (("train", 12), ("test", 7)):
        for c, name in enumerate(("low", "mid", "top")):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                img = Image.new("L", (12, 12), 20 + 3 * i)
                for x in range(12):
                    img.putpixel((x, 2 + 4 * c), 230)
                img.save(root / split / name / f"{i:03d}.png")
    return root


def train_and_eval(tmp_path, overrides, root, capsys, extra_argv=()):
    c = cfg(*overrides, f"dataset.root={root}", f"dataset.cache_dir={tmp_path / 'cache'}",
            "trainer.max_steps=3", "trainer.progress=false")
    summary = scn_experiment.run(build_experiment(c), tmp_path / "run")
    assert summary["status"] == "finished"
    capsys.readouterr()
    assert eval_cli.main([str(tmp_path / "run" / "model.scn"), "--json", *extra_argv]) == 0
    return summary, json.loads(capsys.readouterr().out)


def test_image_folder_run_evaluates_to_its_training_accuracy(tmp_path, capsys):
    root = digits_tree(tmp_path / "digits")
    overrides = ["dataset=image_folder", "model=small_cnn", "model.width=4", "trainer.batch_size=8"]
    summary, out = train_and_eval(tmp_path, overrides, root, capsys, ["--root", str(root)])
    assert out["dataset"] == "digits" and out["test_images"] == 21
    assert out["test_accuracy"] == summary["test_accuracy"]
    assert eval_cli.main([str(tmp_path / "run" / "model.scn")]) == 2  # where the folder is
    assert "--root DIR" in capsys.readouterr().err
    other = digits_tree(tmp_path / "other")
    (other / "test" / "top").rename(other / "test" / "zzz")
    (other / "train" / "top").rename(other / "train" / "zzz")
    assert eval_cli.main([str(tmp_path / "run" / "model.scn"), "--root", str(other)]) == 2
    assert "trained on" in capsys.readouterr().err


def test_cifar10_run_evaluates_to_its_training_accuracy(tmp_path, capsys):
    root = cifar_tree(tmp_path / "cifar10-jpeg")
    overrides = ["+experiment=cifar10_resnet_cpu", "model.width=4", "trainer.batch_size=4"]
    summary, out = train_and_eval(tmp_path, overrides, root, capsys, ["--root", str(root)])
    assert out["dataset"] == "cifar10-jpeg" and out["test_images"] == 10
    assert out["test_accuracy"] == summary["test_accuracy"]
    assert eval_cli.main([str(tmp_path / "run" / "model.scn")]) == 2
    assert "CIFAR-10 (JPEG copy)" in capsys.readouterr().err


@pytest.mark.parametrize("seed", [3])
def test_synthetic_run_keeps_its_generator_settings(tmp_path, capsys, seed):
    c = cfg("dataset=synthetic", f"dataset.seed={seed}", "dataset.num_test=40", "model.width=4",
            "trainer.max_steps=3", "trainer.progress=false", "trainer.batch_size=16")
    summary = scn_experiment.run(build_experiment(c), tmp_path / "run")
    capsys.readouterr()
    assert eval_cli.main([str(tmp_path / "run" / "model.scn"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["test_images"] == 40 and out["test_accuracy"] == summary["test_accuracy"]


def test_cifar10_torchvision_copy_run_evaluates_to_its_training_accuracy(tmp_path, capsys,
                                                                         fake_torchvision):  # noqa: F811
    batches = tmp_path / "tv" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    (batches / "data_batch_1").write_bytes(b"")
    overrides = ["+experiment=cifar10_resnet_cpu", "model.width=4", "trainer.batch_size=2"]
    summary, out = train_and_eval(tmp_path, overrides, tmp_path / "tv", capsys,
                                  ["--root", str(tmp_path / "tv")])
    assert out["dataset"] == "cifar10" and out["test_images"] == 4
    assert out["test_accuracy"] == summary["test_accuracy"]
