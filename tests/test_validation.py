"""Config validation: a wrong type, an unknown key or an out-of-range value fails before any
work starts, with one message naming the key, the value and what is valid."""

import subprocess
from typing import Literal

import pytest
from conftest import SCN_TRAIN

from scn import config
from scn.cli import build_experiment
from scn.errors import ConfigError
from scn.sweep import compose_config
from scn.train import TrainConfig, train

# Data that cannot load: a failure must come from the config, before the data is looked at.
NO_DATA = ["dataset=fashion_mnist", "dataset.root=/no/such/folder", "dataset.download=false"]


@pytest.mark.parametrize("override,message", [
    ("trainer.max_epochs=abc", "trainer.max_epochs='abc' is invalid: it must be an integer >= 1."),
    ("trainer.batch_size=0", "trainer.batch_size=0 is invalid: it must be an integer >= 1."),
    ("trainer.batch_size=2.5", "trainer.batch_size=2.5 is invalid: it must be an integer >= 1."),
    ("trainer.lr=-1", "trainer.lr=-1 is invalid: it must be a number >= 0."),
    ("trainer.lr=inf", "trainer.lr=inf is invalid: it must be a number >= 0."),
    ("trainer.warmup=1", "trainer.warmup=1 is invalid: it must be a number in [0, 1)."),
    ("trainer.checkpoint_every=-5", "trainer.checkpoint_every=-5 is invalid: it must be an integer >= 0."),
    ("trainer.amp=3", "trainer.amp=3 is invalid: it must be true or false."),
    ("trainer.surgery=sometimes", "trainer.surgery='sometimes' is invalid: it must be one of physical, "
                                  "masked, off."),
    ("trainer.device=tpu", "trainer.device='tpu' is invalid: it must be auto, cpu, cuda or cuda:N"),
    ("+trainer.colour=red", "trainer.colour='red' is not a setting: trainer has no key 'colour'. "
                            "Its valid keys are amp, batch_size, budget_bits, channel_multiple,"),
    ("quant.round_bits=maybe", "quant.round_bits='maybe' is invalid: it must be true or false."),
    ("+quant.kind=magic", "quant.kind='magic' is not a setting: quant has no key 'kind'"),
    ("quant.init_bits=abc", "quant.init_bits='abc' is invalid: it must be a number."),
    ("quant.init_bits=17", "quant.init_bits=17 is out of range"),
    ("+quant.colour=red", "quant.colour='red' is not a setting"),
    ("size_loss.warmup=high", "size_loss.warmup='high' is invalid: it must be a number."),
    ("size_loss.gamma=-0.1", "size_loss.gamma=-0.1 is invalid"),
    ("size_loss.gamma=[1,2]", "size_loss.gamma=[1, 2] is invalid: it must be a number."),
    ("model.width=abc", "model.width='abc' is invalid: it must be an integer."),
    ("model.width=0", "model.width=0 must be a positive integer"),
    ("model.name=Transformer", "model.name='Transformer' is invalid: it must be one of"),
    ("+model.depth=3", "model.depth=3 is not a setting: model has no key 'depth'. Its valid keys "
                       "are channels, init_from, name, width."),
    ("+model.channels=[8,16]", "model.channels=[8, 16] must be four positive integers"),
    ("+model.in_channels=3", "model.in_channels cannot be set: scn fills it in itself"),
    ("seed=abc", "seed='abc' is invalid: it must be an integer."),
    ("resume=maybe", "resume='maybe' is invalid: it must be true or false."),
    ("+colour=red", "colour='red' is not a setting: the config has no top-level key 'colour'. "
                    "Its valid keys are dataset, logger, model, quant, resume, seed, size_loss, trainer."),
])
def test_bad_values_fail_before_the_data_is_read(override, message):
    with pytest.raises(ConfigError) as info:
        build_experiment(compose_config([*NO_DATA, override]))
    assert message in str(info.value)


@pytest.mark.parametrize("override,message", [
    ("dataset.augment.flip=2", "dataset.augment.flip=2 is invalid: it must be true or false."),
    ("dataset.num_train=abc", "dataset.num_train='abc' is invalid: it must be an integer."),
    ("+dataset.colour=red", "dataset.colour='red' is not a setting: dataset has no key 'colour'. "
                            "Its valid keys are augment, channels, image_size, num_classes,"),
])
def test_bad_dataset_settings(override, message):
    with pytest.raises(ConfigError) as info:
        build_experiment(compose_config(["dataset=synthetic", override]))
    assert message in str(info.value)


def test_missing_values_are_named():
    with pytest.raises(ConfigError, match=r"dataset.root is required and was not given: add "
                                          r"dataset.root=VALUE"):
        build_experiment(compose_config(["dataset=image_folder"]))


def test_cli_prints_one_paragraph_and_leaves_no_run_folder(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([str(SCN_TRAIN), "dataset=synthetic", "trainer.max_epochs=abc",
                           f"hydra.run.dir={out}"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("scn: error: trainer.max_epochs='abc' is invalid: it must be "
                                   "an integer >= 1.")
    assert not out.exists()


def test_library_users_get_the_same_checks():
    with pytest.raises(ConfigError, match=r"trainer.max_epochs='3' is invalid"):
        TrainConfig(max_epochs="3")
    with pytest.raises(ConfigError, match=r"trainer.progress=1 is invalid: it must be true or false"):
        TrainConfig(progress=1)
    assert TrainConfig(lr=1, warmup=0).lr == 1  # an integer is a number


def test_prune_every_zero_means_no_surgery():
    from scn.data import synthetic
    from scn.methods import Scheme, quantize_
    from scn.models import build
    from scn.schedule import Constant

    model = quantize_(build("SmallCNN", in_channels=1, num_classes=4, width=4), Scheme(init_bits=2))
    cfg = TrainConfig(max_epochs=1, max_steps=3, batch_size=64, prune_every=0, progress=False)
    assert train(model, synthetic(), cfg, Constant(gamma=5.0)).surgeries == 0


def test_matches_and_describes_annotations():
    assert config.matches(3, int) and not config.matches(True, int) and not config.matches(3.0, int)
    assert config.matches(3, float) and config.matches(None, int | None)
    assert config.matches([1, 2], tuple[int, ...] | list[int]) and not config.matches([1, "a"], list[int])
    assert config.matches("a", Literal["a", "b"]) and not config.matches("c", Literal["a", "b"])
    assert config.describe(int | None) == "an integer or null"
    assert config.describe(tuple[int, ...] | list[int]) == "a list of integers"
    assert config.describe(float, config.Range(0, 1, high_open=True)) == "a number in [0, 1)"
    assert str(config.Range(low=0, low_open=True)) == "> 0"
    assert 0.5 in config.Range(0, 1) and float("nan") not in config.Range(0, 1)
