"""scripts/bench_removal.py operates once, at the freeze, whatever the run's length."""

import importlib.util

import pytest
from conftest import ROOT

from scn.data import synthetic
from scn.methods import Scheme, quantize_
from scn.models import build
from scn.optim import freeze_step
from scn.schedule import Constant
from scn.sweep import compose_config
from scn.train import TrainConfig, Trainer

_spec = importlib.util.spec_from_file_location("bench_removal", ROOT / "scripts" / "bench_removal.py")
bench_removal = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_removal)


@pytest.mark.parametrize("method", ["masked", "removal"])
def test_the_benchmark_operates_at_the_freeze(method):
    cfg = compose_config([*bench_removal.COMMON, *bench_removal.METHODS[method]]).trainer
    assert cfg.prune_every == "freeze" and 0 < cfg.freeze_quant < 1


@pytest.mark.parametrize("steps", [20, 30])
def test_prune_every_freeze_operates_once_at_the_freeze_step(steps):
    """The one scheduled surgery falls on the first frozen step, for any length of run."""
    model = quantize_(build("SmallCNN", in_channels=1, num_classes=4, width=8), Scheme(init_bits=3))
    cfg = TrainConfig(max_epochs=20, max_steps=steps, batch_size=64, lr_quant=0.3, eval_every=100,
                      freeze_quant=0.5, prune_every="freeze", progress=False)
    trainer = Trainer(model, synthetic(), cfg, Constant(gamma=2.0), learn_bits=True)
    seen = []
    trainer.prune = lambda physical: seen.append((trainer.step, physical)) or 0
    trainer.run()
    at = freeze_step(trainer.total_steps, 0.5)
    assert seen[0] == (at, True) and all(step == steps for step, _ in seen[1:])  # then the final one


def test_freeze_needs_a_freeze():
    with pytest.raises(Exception, match="trainer.prune_every"):
        TrainConfig(prune_every="freeze")
