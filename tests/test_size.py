"""Size accounting: Q by hand on a toy network, live inputs only, honest float counting."""

import pytest
import torch
from torch import nn

from scn import size
from scn.methods import Scheme, quantize_


def toy():
    # conv 2->3 (3x3, no bias), BN(3), linear 3*2*2 -> 2 (bias)
    return nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(12, 2))


def test_reference_counts_every_scalar():
    ref = size.Reference.of(toy())
    # conv 54 + BN (weight, bias, running mean, running var) 12 + linear 24 + bias 2
    assert ref.scalars == 54 + 12 + 24 + 2
    assert ref.weights == 54 + 24


def test_q_by_hand():
    net = quantize_(toy(), Scheme(init_bits=8))
    with torch.no_grad():
        net[0].b.copy_(torch.tensor([3.0, 2.2, 0.3]))  # stored as 3, 2, 0 bits
        net[4].b.copy_(torch.tensor([5.0, 4.6]))  # 5, 5 bits
    conv_bits = 2 * 9 * (3 + 2 + 0)
    linear_bits = 12 * (5 + 5)
    meta = 16 * (3 + 2)  # one byte for b and one for e, per quantized channel
    floats = 32 * (12 + 2)  # BN's four vectors and the linear bias
    expected = (conv_bits + linear_bits + meta + floats) / 92
    q = size.size_loss(net)
    assert q.item() == pytest.approx(expected)
    rep = size.report(net)
    assert rep.bits_per_weight == pytest.approx(expected)
    assert rep.weight_bits == conv_bits + linear_bits
    assert rep.channels["0"] == (2, 3)
    assert rep.weights_left_pct == pytest.approx(100 * (2 * 2 * 9 + 2 * 12) / 78)


def test_q_gradient_is_live_inputs_times_kernel():
    net = quantize_(toy(), Scheme(init_bits=4))
    size.size_loss(net).backward()
    assert torch.allclose(net[0].b.grad, torch.full((3,), 2 * 9 / 92))
    assert torch.allclose(net[4].b.grad, torch.full((2,), 12 / 92))


def test_dead_inputs_are_not_charged():
    net = quantize_(toy(), Scheme(init_bits=4))
    before = size.size_loss(net).item()
    net[4].in_alive[:4] = False  # channel 0's block of four features is dead
    after = size.size_loss(net).item()
    assert before - after == pytest.approx(4 * 4 * 2 / 92)
    size.size_loss(net).backward()
    assert torch.allclose(net[4].b.grad, torch.full((2,), 8 / 92))


def test_float_model_is_32_bits_and_first_last_count():
    assert size.report(quantize_(toy(), Scheme(kind="none"))).bits_per_weight == pytest.approx(32)
    edges = quantize_(toy(), Scheme(init_bits=4, quantize_first=False, quantize_last=False))
    assert size.report(edges).bits_per_weight == pytest.approx(32)


def test_fixed_scheme_counts_its_bits():
    net = quantize_(toy(), Scheme(kind="fixed", init_bits=4))
    expected = (4 * (54 + 24) + 16 * 5 + 32 * 14) / 92
    assert size.report(net).bits_per_weight == pytest.approx(expected)
    assert size.size_loss(net).item() == pytest.approx(expected)
