"""The training loop on synthetic data: channels die and are removed mid-training."""

import pytest
import torch

from scn import size
from scn.data import synthetic
from scn.errors import ConfigError, NumericalError
from scn.evaluation import recalibrate_norms
from scn.methods import Scheme, quantize_
from scn.models import SmallCNN, build
from scn.quant import sc_layers
from scn.schedule import Constant, Cosine, LinearWarmup
from scn.train import Reporter, TrainConfig, train


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


def _norm_layers(m):
    return [x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)]


def test_recalibrated_statistics_are_those_of_the_data():
    """Stale running statistics are replaced by the batches' own (the first BatchNorm's mean is
    the mean of its input over every training image), and momentum and mode are restored."""
    m, data = model(width=4), synthetic(num_train=512)
    norms = _norm_layers(m)
    for n in norms:
        n.running_mean.fill_(5.0)
        n.running_var.fill_(100.0)
    seen = []
    hook = norms[0].register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    with torch.no_grad():
        m(data.normalize(data.train_x))
    hook.remove()
    expected = seen[0].mean(dim=(0, 2, 3))
    m.eval()
    # two batches of 256 cover the 512 images: the average of equal-sized batch means is the mean
    assert recalibrate_norms(m, data, num_batches=2, batch_size=256) == len(norms)
    torch.testing.assert_close(norms[0].running_mean, expected, rtol=1e-5, atol=1e-6)
    assert all(n.momentum == 0.1 for n in norms) and not m.training
    assert all(float(n.running_var.max()) < 100 for n in norms)
    before = [n.running_mean.clone() for n in norms]
    recalibrate_norms(m, data, num_batches=2, batch_size=256)  # nothing of the old stats is left
    for n, b in zip(norms, before, strict=True):
        torch.testing.assert_close(n.running_mean, b)


def test_recalibration_leaves_training_alone():
    """Re-estimating BatchNorm statistics at each evaluation changes what is evaluated, not what
    is trained: with channels dying and surgery on, the weights end exactly the same."""
    finals = []
    for batches in (0, 3):
        torch.manual_seed(0)
        m = model()
        cfg = TrainConfig(max_epochs=20, max_steps=30, batch_size=64, lr_quant=0.3, prune_every=5,
                          eval_every=10, recalibrate_bn=batches, progress=False)
        result = train(m, synthetic(), cfg, Constant(gamma=2.0))
        assert result.surgeries > 0
        statistics = ("running_mean", "running_var", "num_batches_tracked")
        finals.append({k: v for k, v in m.state_dict().items() if not k.endswith(statistics)})
    assert finals[0].keys() == finals[1].keys()
    for k in finals[0]:
        assert torch.equal(finals[0][k], finals[1][k]), k


def test_recalibrate_bn_must_be_non_negative():
    with pytest.raises(ConfigError, match="recalibrate_bn"):
        TrainConfig(recalibrate_bn=-1)


def test_frozen_bit_depths_stay_while_weights_train():
    """With freeze_quant=0.5 the bit depths and exponents move in the first half (channels die)
    and not at all in the second, while the weights keep training to the end."""
    m = model()
    bits_before = size.report(m).bits_per_weight
    seen = {}

    class Snapshot(Reporter):
        def evaluated(self, row):
            seen[row["step"]] = {k: v.detach().clone() for k, v in m.named_parameters()}

    cfg = TrainConfig(max_epochs=20, max_steps=30, batch_size=64, lr_quant=0.3, prune_every=5,
                      eval_every=15, freeze_quant=0.5, progress=False)
    result = train(m, synthetic(), cfg, Constant(gamma=2.0), reporter=Snapshot())
    assert result.surgeries > 0 and result.history[0]["bits_per_weight"] < bits_before
    half, end = seen[15], seen[30]
    quant = [k for k in end if k.endswith((".b", ".e"))]
    weights = [k for k in end if k.endswith(".weight")]
    assert quant and all(torch.equal(half[k], end[k]) for k in quant)  # same shapes: none removed
    assert all(not torch.equal(half[k], end[k]) for k in weights)
    assert result.history[0]["bits_per_weight"] == result.history[-1]["bits_per_weight"]


def test_a_size_budget_stops_the_shrinking_where_it_is_reached():
    """trainer.stop_shrinking_at: once a surgery leaves that % of the weights or fewer, gamma is
    0 for every later step and no channel dies after it; without it the same run shrinks on."""
    def run(budget):
        m, logged = model(), []

        class Log(Reporter):
            def logged(self, rows):
                logged.extend(rows)

        cfg = TrainConfig(max_epochs=20, max_steps=40, batch_size=64, lr_quant=0.3, prune_every=5,
                          eval_every=5, stop_shrinking_at=budget, progress=False)
        return train(m, synthetic(), cfg, Constant(gamma=2.0), reporter=Log()), logged

    free, free_log = run(0.0)
    left = [row["weights_left_pct"] for row in free.history]
    assert left[-1] < left[1] < 100  # shrinking on to the end
    budget = left[1]  # reached at the second surgery's evaluation
    capped, log = run(budget)
    reached = next(r["step"] for r in capped.history if r["weights_left_pct"] <= budget)
    assert [r["weights_left_pct"] for r in capped.history if r["step"] >= reached] == \
        [capped.history[-1]["weights_left_pct"]] * sum(r["step"] >= reached for r in capped.history)
    assert all(r["gamma"] == 0 for r in log if r["step"] > reached)
    assert all(r["gamma"] > 0 for r in log if r["step"] <= reached)
    assert capped.history[-1]["weights_left_pct"] > left[-1]
    with pytest.raises(ConfigError, match="stop_shrinking_at"):
        TrainConfig(stop_shrinking_at=120)


def test_budget_bits_raise_the_survivors_where_the_budget_is_reached():
    """trainer.budget_bits: at the size budget every live channel below it is raised to it;
    it needs a budget."""
    m = model(bits=2)
    cfg = TrainConfig(max_epochs=20, max_steps=40, batch_size=64, lr_quant=0.3, prune_every=5,
                      eval_every=5, stop_shrinking_at=99, budget_bits=4, progress=False)
    result = train(m, synthetic(), cfg, Constant(gamma=2.0))
    assert result.surgeries > 0 and result.history[-1]["weights_left_pct"] < 99
    bits = torch.cat([layer.int_bits() for _, layer in sc_layers(m) if layer.quantized])
    assert bits[bits > 0].min() >= 4  # every survivor, from 2 bits
    with pytest.raises(ConfigError, match="budget_bits"):
        TrainConfig(budget_bits=3)


def test_hold_bits_keeps_every_bit_depth_from_the_budget_on():
    """trainer.hold_bits: from the surgery that reaches the budget, every b stays where it was
    (the task loss moves them without it), while the exponents go on learning; it needs a budget."""
    def run(hold):
        m = model(bits=4)
        cfg = TrainConfig(max_epochs=20, max_steps=40, batch_size=64, lr_quant=0.3, prune_every=5,
                          eval_every=5, stop_shrinking_at=99, hold_bits=hold, progress=False)
        seen = {}

        class Watch(Reporter):
            def evaluated(self, row):
                layers = [layer for _, layer in sc_layers(m) if layer.quantized]
                seen[row["step"]] = [torch.cat([getattr(x, k).detach().clone() for x in layers])
                                     for k in ("b", "e")]

        result = train(m, synthetic(), cfg, Constant(gamma=2.0), reporter=Watch())
        reached = next(r["step"] for r in result.history if r["weights_left_pct"] <= 99)
        return seen[reached], seen[result.history[-1]["step"]]

    (b0, e0), (b1, e1) = run(True)
    assert torch.equal(b0, b1) and not torch.equal(e0, e1)
    (b0, _), (b1, _) = run(False)
    assert not torch.equal(b0, b1)
    with pytest.raises(ConfigError, match="hold_bits"):
        TrainConfig(hold_bits=True)


def test_freeze_quant_must_be_a_fraction_below_one():
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="freeze_quant"):
            TrainConfig(freeze_quant=bad)


def test_constant_quant_schedule_keeps_the_bit_depths_learning_rate():
    """quant_lr_schedule=constant: b and e warm up as the weights do, then keep lr_quant while
    the weights' rate decays to zero; a freeze still stops them."""
    from scn.optim import lr_lambdas, make_optimizer

    m = model()
    for schedule, freeze in (("cosine", 0.0), ("constant", 0.0), ("constant", 0.25)):
        cfg = TrainConfig(quant_lr_schedule=schedule, warmup=0.1, freeze_quant=freeze, progress=False)
        opt = make_optimizer(m, cfg)
        weights, quant = lr_lambdas(opt, m, 100, cfg)
        assert quant(0) == weights(0) < 1 and quant(5) == weights(5)  # the same warm-up
        assert weights(99) < 0.01
        expected = {"cosine": weights(60), "constant": 1.0}[schedule]
        assert quant(60) == expected
        assert quant(99) == (0.0 if freeze else expected if schedule == "constant" else weights(99))


def test_unknown_quant_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="quant_lr_schedule"):
        TrainConfig(quant_lr_schedule="linear")
