"""quant.min_bits: live channels hold at least that many bits, in the forward pass, in Q and
in the file alike; a channel pulled below them dies instead of shrinking to 1 bit."""

import pytest
import torch
from test_fused import hard_model, same_bits

from scn import checkpoint, fused, size
from scn import format as scn_format
from scn.errors import ConfigError
from scn.methods import SelfCompress
from scn.quant import quantize, raise_live_bits


def min2(**kw):
    return SelfCompress(min_bits=2, **kw)


def test_live_channels_below_two_bits_are_held_at_two_and_dead_ones_stay_dead():
    b = torch.tensor([-1.0, 0.0, 1.0, 2.0, 5.0], requires_grad=True)
    raised = raise_live_bits(b, 2)
    assert raised.tolist() == [-1.0, 0.0, 2.0, 2.0, 5.0]
    raised.sum().backward()
    assert b.grad.tolist() == [1.0] * 5  # straight through: b keeps moving towards 0
    assert raise_live_bits(b, 1) is b


def test_a_one_bit_channel_uses_the_two_bit_grid():
    w = torch.tensor([[-3.0, -2.0, -1.0, 0.0, 1.0, 2.0]])
    e = torch.zeros(1)
    one = quantize(w, torch.tensor([1.2]), e, min_bits=1)
    two = quantize(w, torch.tensor([1.2]), e, min_bits=2)
    assert one.tolist() == [[-1.0, -1.0, -1.0, 0.0, 0.0, 0.0]]  # the sign-less grid {-1, 0}
    assert two.tolist() == [[-2.0, -2.0, -1.0, 0.0, 1.0, 1.0]]
    assert quantize(w, torch.tensor([0.4]), e, min_bits=2).abs().sum() == 0


@pytest.mark.parametrize("name", ["SmallCNN", "ResNet9"])
def test_fused_quantizer_and_size_term_equal_the_reference_with_min_bits(name):
    model, layers = hard_model(name, torch.float32, True, False, 0, method=min2)
    assert all(m.min_bits == 2 for m in layers)
    with torch.no_grad():
        layers[0].b[3:6] = torch.tensor([0.6, 1.0, 1.4])  # would be 1-bit channels
    outs = fused.quantized_weights(fused.plan_of(model))
    grads = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, grads)
    got = [(o.detach(), m.weight.grad, m.b.grad, m.e.grad) for o, m in zip(outs, layers, strict=True)]
    model.zero_grad(set_to_none=True)
    ref = [m._quantized_weight() for m in layers]
    torch.autograd.backward(ref, grads)
    for m, r, g in zip(layers, ref, got, strict=True):
        for a, b in zip(g, (r.detach(), m.weight.grad, m.b.grad, m.e.grad), strict=True):
            assert same_bits(a, b)
    bits = torch.cat([m.int_bits() for m in layers])
    assert not bool((bits == 1).any()) and bool((bits == 0).any())
    assert layers[0].int_bits()[3:6].tolist() == [2, 2, 2]
    q = size.size_loss(model, size.fixed_bits(model))
    assert float(q.detach()) == pytest.approx(size.report(model).bits_per_weight)


def test_min_bits_is_validated():
    for bad in (0, 17, 1.5):
        with pytest.raises(ConfigError, match="quant.min_bits"):
            SelfCompress(min_bits=bad)
    with pytest.raises(ConfigError, match="round_bits"):
        SelfCompress(min_bits=2, round_bits=False)


def test_a_reloaded_model_keeps_min_bits(tmp_path):
    """model.safetensors holds real-valued b: reloaded without min_bits, a channel at b 1.2
    would quantize on the 1-bit grid and the model would not be the trained one."""
    model, layers = hard_model("SmallCNN", torch.float32, True, False, 0, method=min2)
    with torch.no_grad():
        layers[1].b[2:4] = torch.tensor([1.2, 0.7])  # held at 2 bits in training
    model.eval()
    x = torch.randn(4, 1, 28, 28)
    checkpoint.save_checkpoint(model, tmp_path / "model.safetensors")
    again, header = checkpoint.load_checkpoint(tmp_path / "model.safetensors")
    assert header["scheme"]["min_bits"] == 2
    assert all(m.min_bits == 2 for _, m in scn_format.sc_layers(again))
    assert size.report(again).ideal_bytes == size.report(model).ideal_bytes
    assert torch.equal(again(x), model(x))
    scn_format.save(model, tmp_path / "model.scn")
    assert scn_format.read_header(tmp_path / "model.scn")["scheme"]["min_bits"] == 2


def test_the_papers_form_writes_no_min_bits_key(tmp_path):
    model, _ = hard_model("SmallCNN", torch.float32, True, False, 0)
    scn_format.save(model, tmp_path / "model.scn")
    assert "min_bits" not in scn_format.read_header(tmp_path / "model.scn")["scheme"]
