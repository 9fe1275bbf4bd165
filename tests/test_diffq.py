"""The DiffQ baseline: same loop, same size accounting, a clear error when the extra is missing."""

import sys

import pytest

from scn.data import synthetic
from scn.errors import ConfigError
from scn.evaluation import evaluate
from scn.methods import Scheme, quantize_
from scn.models import build
from scn.schedule import Constant
from scn.train import TrainConfig, Trainer


def model():
    return quantize_(build("SmallCNN", in_channels=1, num_classes=4, width=8), Scheme(kind="diffq"))


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffq", None)  # makes `import diffq` fail
    cfg = TrainConfig(max_epochs=1, max_steps=2, batch_size=32, progress=False)
    with pytest.raises(ConfigError, match=r"\.\[diffq\]"):
        Trainer(model(), synthetic(), cfg, Constant(1.0), learn_bits=False)


def test_penalty_shrinks_the_model_and_weights_end_quantized():
    pytest.importorskip("diffq")
    m = model()
    cfg = TrainConfig(max_epochs=20, batch_size=32, progress=False, channels_last=False)
    trainer = Trainer(m, synthetic(), cfg, Constant(gamma=1000.0), learn_bits=False)
    before = trainer.size.report().bits_per_weight
    result = trainer.run()
    rep = trainer.size.report()
    assert rep.bits_per_weight < before  # the penalty pulled bits down
    assert result.history[-1]["bits_per_weight"] == pytest.approx(rep.bits_per_weight)
    # scn's accounting = DiffQ's own true size plus the float buffers DiffQ does not count
    buffers = sum(b.numel() * 32 for n, b in m.named_buffers() if "running" in n)
    assert rep.total_bits == pytest.approx(trainer.size.true_bytes() * 8 + buffers, rel=1e-6)
    acc = result.history[-1]["test_accuracy"]
    trainer.size.finish()  # quantized weights stay, DiffQ's hooks and logits go
    assert not any(n.endswith("_diffq") for n, _ in m.named_parameters())
    assert evaluate(m, trainer.data)[0] == pytest.approx(acc)  # evaluated as DiffQ evaluated it
