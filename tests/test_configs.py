"""Every config composes, and bad configs fail early with a clear message."""

from pathlib import Path

import pytest
from conftest import CONFIGS
from hydra import compose, initialize_config_dir

from scn.cli import build_experiment
from scn.errors import ConfigError, DataError

EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
GROUPS = {g: sorted(p.stem for p in (CONFIGS / g).glob("*.yaml"))
          for g in ("dataset", "model", "quant", "size_loss", "trainer")}


def cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(name):
    c = cfg(f"+experiment={name}")
    assert {"dataset", "model", "quant", "size_loss", "trainer", "seed"} <= set(c)


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_builds(group, option):
    exp = build_experiment(cfg("dataset=synthetic", f"{group}={option}") if group != "dataset"
                           else cfg("dataset=synthetic"))
    assert exp.trainer.batch_size > 0
    if group != "dataset":
        return
    # datasets other than synthetic may need files: composing must work regardless
    assert cfg(f"dataset={option}").dataset._target_


def test_script_override_names_exist():
    c = cfg("dataset=synthetic", "model=small_cnn", "quant=fixed", "size_loss=constant",
            "size_loss.gamma=0.5", "trainer.max_epochs=3", "seed=7")
    exp = build_experiment(c)
    assert exp.schedule.gamma == 0.5 and exp.trainer.max_epochs == 3 and exp.seed == 7


@pytest.mark.parametrize("overrides,match", [
    (["size_loss.gamma=-0.1"], "gamma"),
    (["quant.init_bits=0"], "init_bits"),
    (["quant.init_bits=-2"], "init_bits"),
    (["quant.init_bits=17"], "init_bits"),
    (["trainer.batch_size=0"], "batch_size"),
    (["trainer.surgery=sometimes"], "surgery"),
    (["model.width=0"], "width"),
    (["+quant.colour=red"], "quant"),
    (["model.width=100000"], "GiB to train at trainer.batch_size=128, more than"),
    (["dataset.image_size=3"], "cannot take the dataset's inputs of shape \\[1, 3, 3\\]"),
])
def test_bad_values_raise_config_error(overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_experiment(cfg("dataset=synthetic", *overrides))


def test_missing_dataset_root(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        build_experiment(cfg(f"dataset.root={tmp_path / 'nowhere'}"))


@pytest.mark.parametrize("name", [e for e in EXPERIMENTS if e != "fashion_mnist_finetune"])
@pytest.mark.parametrize("quant", ["none", "fixed", "self_compress"])
def test_experiment_builds_with_every_scheme(name, quant):
    # the float and QAT variants each experiment's comment offers must build as they are
    exp = build_experiment(cfg(f"+experiment={name}", "dataset=synthetic", f"quant={quant}"))
    assert exp.trainer.max_epochs > 0


@pytest.mark.parametrize("experiment", ["cifar10_resnet", "cifar10_resnet_cpu"])
def test_the_cifar10_experiments_carry_the_removal_recipe(experiment):
    # the ninth round's recipe: charged columns, survivors at 5 bits or more, half the weights
    exp = build_experiment(cfg(f"+experiment={experiment}", "dataset=synthetic"))
    assert exp.trainer.stop_shrinking_at == 50 and exp.scheme.min_bits == 5
    assert exp.scheme.live_input_grad == 7 and exp.scheme.exponent_refit
    assert exp.schedule.gamma == 0.012


def test_the_cifar10_benchmark_keeps_plain_self_compression_beside_the_recipe():
    import bench_cifar10 as bench  # scripts/ is on the path (conftest)

    assert bench.METHODS["self_compress_removal_budget"] == []  # the experiment itself
    plain = build_experiment(cfg("+experiment=cifar10_resnet_cpu", "dataset=synthetic",
                                 *bench.METHODS["self_compress"]))
    assert plain.scheme.live_input_grad == 0 and plain.scheme.min_bits == 1
    assert plain.trainer.stop_shrinking_at == 0 and plain.schedule.gamma == 0.05
    # every other method starts from plain self-compression: its runs are the earlier rounds'
    for method, overrides in bench.METHODS.items():
        assert not overrides or overrides[:len(bench.PLAIN)] == bench.PLAIN, method


def test_the_paper_regime_experiment_is_the_studys_recipe():
    # the tenth round's recipe at the thirteenth round's width, as bench_paper_regime.py trains it
    exp = build_experiment(cfg("+experiment=fashion_mnist_paper_regime", "dataset=synthetic"))
    assert (exp.trainer.stop_shrinking_at, exp.trainer.budget_bits, exp.trainer.prune_every) == (25, 2, 50)
    assert exp.scheme.min_bits == 2 and exp.scheme.live_input_grad == 1
    assert exp.scheme.live_input_spread == "per_bit" and exp.trainer.lr_quant == 0.02
    assert exp.model.keywords["width"] == 48 and exp.schedule.gamma == 0.3
