"""The training loop on synthetic data: channels die and are removed mid-training."""

import pytest
import torch

from scn import size
from scn.data import synthetic
from scn.errors import NumericalError
from scn.models import SmallCNN, build
from scn.quant import Scheme, quantize_
from scn.schedule import Constant, Cosine, LinearWarmup
from scn.train import TrainConfig, train


def model(kind="self_compress", width=8, bits=3):
    net = build("SmallCNN", in_channels=1, num_classes=4, width=width)
    return quantize_(net, Scheme(kind=kind, init_bits=bits))


@pytest.mark.parametrize("mode", ["physical", "masked"])
def test_channels_die_and_training_continues(mode):
    m = model()
    params_before = size.report(m).param_count
    cfg = TrainConfig(max_epochs=20, max_steps=40, batch_size=64, lr_quant=0.3, prune_every=5,
                      eval_every=20, surgery=mode, progress=False)
    result = train(m, synthetic(), cfg, Constant(gamma=2.0))
    assert result.surgeries > 0
    final = result.history[-1]
    assert final["bits_per_weight"] < result.history[0]["bits_per_weight"]
    # every run ends physically shrunk, so the model that is saved is the small one
    assert size.report(m).param_count < params_before
    assert final["param_count"] == size.report(m).param_count


def test_float_and_fixed_runs_do_not_change_size():
    for kind in ("none", "fixed"):
        m = model(kind)
        bits = size.report(m).bits_per_weight
        cfg = TrainConfig(max_epochs=1, max_steps=6, batch_size=64, progress=False)
        result = train(m, synthetic(), cfg, Constant(gamma=1.0))
        assert result.history[-1]["bits_per_weight"] == pytest.approx(bits)


def test_learning_happens():
    m = model("none", width=4)
    cfg = TrainConfig(max_epochs=3, batch_size=32, progress=False)
    result = train(m, synthetic(), cfg, Constant(gamma=0.0))
    assert result.history[-1]["test_accuracy"] > 90  # 4 classes: chance is 25%


def test_nan_stops_with_a_clear_error():
    m = model("none", width=4)
    cfg = TrainConfig(max_epochs=1, max_steps=5, batch_size=32, lr=1e30, progress=False)
    with pytest.raises(NumericalError, match="step"):
        train(m, synthetic(), cfg, Constant(gamma=0.0))


def test_schedules():
    assert Constant(0.1)(0, 100) == 0.1
    warm = LinearWarmup(gamma=1.0, warmup=0.5)
    assert [warm(s, 100) for s in (0, 25, 50, 99)] == [0.0, 0.5, 1.0, 1.0]
    cos = Cosine(gamma=1.0, warmup=0.0, final=0.1)
    assert cos(0, 100) == pytest.approx(1.0) and cos(100, 100) == pytest.approx(0.1)
    assert cos(50, 100) == pytest.approx(0.55)


def test_reference_survives_shrinking():
    m = quantize_(SmallCNN(width=4), Scheme())
    assert m.scn_reference.scalars == size.Reference.of(SmallCNN(width=4)).scalars
    with torch.no_grad():
        m[0].b[:2] = 0
    assert size.report(m).reference_scalars == m.scn_reference.scalars
