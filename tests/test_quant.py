"""The quantizer q(x, b, e): values, straight-through gradients, initial exponents."""

import math

import pytest
import torch
from torch import nn

from scn.data import synthetic
from scn.errors import ConfigError
from scn.methods import Scheme, SelfCompress, quantize_
from scn.models import build
from scn.quant import (
    SCConv2d,
    SCLinear,
    best_exponents,
    initial_exponent,
    quant_parameters,
    quantize,
    round_ste,
    weight_parameters,
)
from scn.schedule import Constant
from scn.train import TrainConfig, train


def q(w, b, e, round_bits=True):
    return quantize(torch.tensor(w).view(-1, 1), torch.tensor([float(b)]), torch.tensor([float(e)]),
                    round_bits).view(-1).tolist()


def test_hand_picked_values():
    # b=3, e=0: integers clamped to [-4, 3]
    assert q([0.2, 0.6, -1.4, 2.5, 3.7, 10.0, -4.2, -9.0], 3, 0) == [0, 1, -1, 2, 3, 3, -4, -4]
    # b=2, e=-2: step 0.25, codes in [-2, 1] -> values in [-0.5, 0.25]
    assert q([0.1, 0.2, -0.3, 0.9, -0.9], 2, -2) == [0.0, 0.25, -0.25, 0.25, -0.5]
    # b=4, e=1: step 2, codes in [-8, 7]
    assert q([3.1, -20.0, 100.0], 4, 1) == [4.0, -16.0, 14.0]
    # b=1: the only codes are -1 and 0
    assert q([0.4, -0.6, 5.0, -5.0], 1, 0) == [0.0, -1.0, 0.0, -1.0]


@pytest.mark.parametrize("b", [0.0, 0.3, -0.2, -3.0])
def test_bits_at_or_below_zero_give_exact_zeros(b):
    w = torch.randn(5, 7)
    out = quantize(w, torch.full((5,), b), torch.zeros(5))
    assert torch.equal(out, torch.zeros_like(out))


def test_real_bits_mode_uses_fractional_range():
    # b=2.5 unrounded: range [-2^1.5, 2^1.5 - 1] = [-2.83, 1.83] -> codes -3..2 after rounding
    assert q([-2.9, 1.9, 1.4], 2.5, 0, round_bits=False) == [-3.0, 2.0, 1.0]


def test_straight_through_gradient_of_weights():
    w = torch.tensor([[0.3, -0.7, 5.0]], requires_grad=True)  # 5.0 is clipped at b=3, e=0
    out = quantize(w, torch.tensor([3.0]), torch.tensor([0.0]))
    out.sum().backward()
    assert w.grad.tolist() == [[1.0, 1.0, 0.0]]  # identity inside the range, zero where clipped


def test_gradients_reach_bits_and_exponent():
    w = torch.tensor([[0.3, 5.0]])
    b = torch.tensor([3.0], requires_grad=True)
    e = torch.tensor([0.0], requires_grad=True)
    quantize(w, b, e).sum().backward()
    # only the clipped weight (5.0 -> high = 2^(b-1) - 1) depends on b: d/db = ln2 * 2^(b-1)
    assert b.grad.item() == pytest.approx(math.log(2) * 4)
    # d/de of 2^e * round_ste(clamp(2^-e w)): the straight-through part cancels for the
    # in-range weight (d/de = ln2 * (q - w)) and the clipped one gives ln2 * 2^e * 3
    expected = math.log(2) * ((0.0 - 0.3) + 3.0)
    assert e.grad.item() == pytest.approx(expected, rel=1e-5)


def test_dead_channel_gets_no_gradient():
    w = torch.randn(2, 4)
    b = torch.tensor([0.2, 4.0], requires_grad=True)
    e = torch.tensor([-2.0, -2.0], requires_grad=True)
    quantize(w * 10, b, e).sum().backward()
    assert b.grad[0] == 0 and e.grad[0] == 0


def test_round_ste_passes_gradient():
    x = torch.tensor([0.4, 1.6], requires_grad=True)
    round_ste(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_initial_exponent_does_not_clip_and_is_tight(bits):
    w = torch.randn(6, 3, 3, 3) * torch.logspace(-3, 1, 6).view(-1, 1, 1, 1)
    e = initial_exponent(w, bits)
    high = 2 ** (bits - 1) - 1
    top = w.abs().flatten(1).amax(1)
    assert torch.all(top <= high * torch.exp2(e))  # no clipping of the largest weight
    assert torch.all(top > high * torch.exp2(e - 1))  # one exponent smaller would clip
    if bits == 8:
        err = (quantize(w, torch.full((6,), 8.0), e) - w).abs().flatten(1).amax(1)
        assert torch.all(err <= top / 127)  # close to lossless


def _net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def test_quantize_converts_layers_and_keeps_weights():
    net = _net()
    weight = net[0].weight
    quantize_(net, Scheme(kind="self_compress", init_bits=6))
    assert isinstance(net[0], SCConv2d) and isinstance(net[3], SCLinear)
    assert net[0].weight is weight
    assert net[0].b.tolist() == [6.0] * 4 and net[0].b.requires_grad
    assert len(quant_parameters(net)) == 4
    assert {id(p) for p in weight_parameters(net)}.isdisjoint({id(p) for p in quant_parameters(net)})


def test_scheme_variants():
    fixed = quantize_(_net(), Scheme(kind="fixed", init_bits=4))
    assert not fixed[0].b.requires_grad and fixed[0].e.requires_grad
    none = quantize_(_net(), Scheme(kind="none"))
    assert not none[0].quantized and quant_parameters(none) == []
    x = torch.randn(2, 1, 6, 6)
    torch.manual_seed(0)
    ref = _net()
    torch.manual_seed(0)
    assert torch.allclose(quantize_(_net(), Scheme(kind="none"))(x), ref(x))
    edges = quantize_(_net(), Scheme(quantize_first=False, quantize_last=False))
    assert not edges[0].quantized and not edges[3].quantized


def test_bad_schemes_are_clear():
    with pytest.raises(ConfigError, match="init_bits"):
        Scheme(kind="self_compress", init_bits=0)
    with pytest.raises(ConfigError, match="valid choices"):
        Scheme(kind="ternary")


def test_quantized_forward_matches_functional():
    net = quantize_(_net(), Scheme(init_bits=3))
    x = torch.randn(2, 1, 6, 6)
    layer = net[0]
    expected = torch.nn.functional.conv2d(x, quantize(layer.weight, layer.b, layer.e), layer.bias)
    assert torch.allclose(layer(x), expected)


@pytest.mark.parametrize("c_in", [1, 3, 4])
def test_strided_pointwise_conv_is_the_strided_convolution(c_in):
    """A ResNet shortcut (1x1, stride 2) over a few channels-last inputs: the case that hangs
    oneDNN's backward pass on AVX2 CPUs. Same values and gradients as the plain convolution."""
    layer = quantize_(nn.Sequential(nn.Conv2d(c_in, 8, 1, stride=2, bias=False)), Scheme(init_bits=4))[0]
    x = torch.randn(32, c_in, 15, 15).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = layer(x)
    y.square().sum().backward()
    x_ref = x.detach().contiguous().requires_grad_()
    w_ref = quantize(layer.weight, layer.b, layer.e).detach().requires_grad_()
    y_ref = torch.nn.functional.conv2d(x_ref, w_ref, stride=2)
    y_ref.square().sum().backward()
    assert y.shape == y_ref.shape == (32, 8, 8, 8)
    assert torch.allclose(y, y_ref, atol=1e-5)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-4)
    assert layer.weight.grad is not None and layer.b.grad is not None


def test_frozen_quantizes_once_and_changes_nothing(monkeypatch):
    net = quantize_(_net(), Scheme(init_bits=3)).eval()
    x = torch.randn(2, 1, 6, 6)
    expected = net(x)
    calls = []
    original = SCConv2d._quantized_weight
    monkeypatch.setattr(SCConv2d, "_quantized_weight", lambda self: calls.append(1) or original(self))
    from scn.quant import frozen

    with torch.no_grad(), frozen(net):
        for _ in range(3):
            assert torch.equal(net(x), expected)
    assert len(calls) == 1
    net(x)
    assert len(calls) == 2  # outside, every forward quantizes again (weights may have changed)


def test_refit_exponents_takes_the_least_squares_exponent_of_live_channels():
    torch.manual_seed(0)
    net = quantize_(_net(), Scheme(kind="self_compress", init_bits=3))
    layer = net[0]
    bits = [2.0, 3.0, 5.0]
    best = []
    for c, b in enumerate(bits):
        w = layer.weight[c].detach().flatten()
        errors = {e: float(((w - torch.tensor(q(w.tolist(), b, e))) ** 2).sum()) for e in range(-12, 3)}
        best.append(min(errors, key=errors.get))
    with torch.no_grad():
        layer.b.copy_(torch.tensor([*bits, 0.0]))  # the last channel is dead
        layer.e.copy_(torch.tensor([best[0] - 2, best[1] - 3, best[2] + 1, 4.0]))  # clipped, coarse
    layer.refit_exponents()
    assert layer.e.tolist() == [*best, 4.0]  # a dead channel's exponent is left alone
    refit = best_exponents(layer.weight[:3], torch.tensor([2, 3, 5]), layer.e[:3])
    assert torch.equal(refit, layer.e[:3].detach())  # a fixed point


def test_refine_bits_raises_live_channels_to_a_finer_grid_that_holds_every_old_value():
    torch.manual_seed(0)
    net = quantize_(_net(), Scheme(kind="self_compress", init_bits=3))
    layer = net[0]
    with torch.no_grad():
        layer.b.copy_(torch.tensor([1.2, 2.0, 4.0, 0.0]))  # 1, 2 and 4 bits, and a dead channel
        layer.e.copy_(torch.tensor([-1.0, -2.0, -3.0, 4.0]))
    before = layer.effective_weight().detach()
    layer.refine_bits(3)
    assert layer.int_bits().tolist() == [3, 3, 4, 0]
    assert layer.int_exponents().tolist() == [-3, -3, -3, 4]  # as many steps finer as bits added
    after = layer.effective_weight().detach()
    assert not torch.equal(after[:2], before[:2])  # finer: closer to the weights
    w = layer.weight.detach()
    assert ((after[:2] - w[:2]) ** 2).sum() < ((before[:2] - w[:2]) ** 2).sum()
    assert torch.equal(after[2:], before[2:])  # at or above 3 bits, or dead: untouched
    for c in range(2):  # the new grid holds every value of the old one
        held = quantize(before[c:c + 1], layer.b[c:c + 1], layer.e[c:c + 1])
        assert torch.equal(held, before[c:c + 1])
    layer.min_bits = 3  # a floor stores b = 0.7 with 3 bits, one step of b from death
    with torch.no_grad():
        layer.b.copy_(torch.tensor([0.7, 3.0, 4.0, 0.0]))
    exponents = layer.int_exponents().clone()
    layer.refine_bits(3)
    assert layer.b.tolist() == [3.0, 3.0, 4.0, 0.0] and torch.equal(layer.int_exponents(), exponents)


def test_training_with_exponent_refit_leaves_least_squares_exponents():
    net = quantize_(build("SmallCNN", in_channels=1, num_classes=4, width=8),
                    SelfCompress(init_bits=3, exponent_refit=True))
    cfg = TrainConfig(max_epochs=1, max_steps=10, batch_size=32, prune_every=10, eval_every=10,
                      progress=False)
    train(net, synthetic(), cfg, Constant(gamma=0.0))  # the last step is a surgery check
    layer = net[3]
    live = layer.int_bits() > 0
    assert live.any()
    assert torch.equal(best_exponents(layer.weight[live], layer.int_bits()[live], layer.e[live]),
                       layer.e[live].detach())
