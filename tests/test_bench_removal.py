"""scripts/bench_removal.py operates once, at the freeze: its step must follow the config."""

import importlib.util

import pytest
from conftest import ROOT

from scn.optim import freeze_step
from scn.sweep import compose_config

_spec = importlib.util.spec_from_file_location("bench_removal", ROOT / "scripts" / "bench_removal.py")
bench_removal = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_removal)

FASHION_MNIST_TRAIN = 60_000  # training images; batches drop the last partial one


@pytest.mark.parametrize("method", ["masked", "removal"])
def test_the_one_surgery_falls_on_the_freeze(method):
    """If the experiment's length or freeze fraction changes, the hard-coded step must too:
    a surgery after the freeze step would leave the runs masked for longer, one before it
    would let them drift apart while b and e still learn."""
    cfg = compose_config([*bench_removal.COMMON, *bench_removal.METHODS[method]]).trainer
    total = cfg.max_epochs * (FASHION_MNIST_TRAIN // cfg.batch_size)
    freeze_at = freeze_step(total, cfg.freeze_quant)
    assert 0 < freeze_at < total
    assert cfg.prune_every == freeze_at


def test_an_override_that_moves_the_freeze_needs_the_surgery_step():
    with pytest.raises(SystemExit, match="trainer.prune_every=<the freeze step>"):
        bench_removal.check_surgery_step(["trainer.max_epochs=4"])
    with pytest.raises(SystemExit, match="trainer.freeze_quant=0.25"):
        bench_removal.check_surgery_step(["model.width=8", "trainer.freeze_quant=0.25"])
    bench_removal.check_surgery_step(["trainer.max_epochs=4", "trainer.prune_every=936"])
    bench_removal.check_surgery_step(["model.width=8", "seed=3", "dataset.root=/data/fmnist"])
    with pytest.raises(SystemExit, match="dataset=cifar10"):
        bench_removal.check_surgery_step(["dataset=cifar10"])
