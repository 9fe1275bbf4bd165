"""The fused quantizer, size term and optimizer group against their reference formulations.

"Bit for bit" compares bit patterns after adding +0.0, which equates the two zeros: the fused
function may give -0.0 where the reference gives +0.0 (a weight that is zero either way).
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from scn import fused, quant, size, surgery
from scn.data import synthetic
from scn.methods import FixedBits, SelfCompress, quantize_
from scn.models import build
from scn.optim import make_optimizer
from scn.quant import MAX_BITS, ceil_ste, round_ste, sc_layers
from scn.schedule import Constant
from scn.train import Reporter, TrainConfig, Trainer


def same_bits(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    ints = {torch.float32: torch.int32, torch.float64: torch.int64}[a.dtype]
    return (a.shape == b.shape and a.dtype == b.dtype
            and torch.equal((a + 0.0).contiguous().view(ints), (b + 0.0).contiguous().view(ints)))


def reference_size_loss(model, fixed):
    """scn's size term as it was written per layer, before it was fused."""
    total = None
    for _, layer in sc_layers(model):
        if not layer.quantized or not layer.b.requires_grad:
            continue
        b = round_ste(layer.b) if layer.round_bits else ceil_ste(layer.b)
        bits = b.clamp(min=0, max=MAX_BITS)
        term = layer.in_alive.sum().to(bits.dtype) * layer.kernel_numel() * bits.sum()
        total = term if total is None else total + term
    return (total + fixed.to(total.device, total.dtype)) / size.reference_of(model).scalars


def hard_model(name, dtype, round_bits, channels_last, seed, method=SelfCompress):
    """A converted model whose bit depths span dead, live and clamped (>= 16) channels, with
    weights on the clipping bounds (ties) and masked inputs."""
    torch.manual_seed(seed)
    kw = {"in_channels": 1, "image_size": 28} if name == "SmallCNN" else {"in_channels": 3}
    model = build(name, num_classes=10, width=8, **kw)
    model = quantize_(model, method(init_bits=3, round_bits=round_bits)).to(dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    layers = [m for _, m in sc_layers(model) if m.quantized]
    with torch.no_grad():
        for m in layers:
            m.b.copy_(torch.rand_like(m.b) * 20 - 2)
            m.b[:3] = torch.tensor([0.3, 2.0, 16.0])
            m.e.add_(torch.randint(-1, 2, m.e.shape).to(dtype))
            scale = torch.exp2(torch.round(m.e)).view(-1, *[1] * (m.weight.dim() - 1))
            half = torch.exp2(torch.round(m.b).clamp(max=MAX_BITS) - 1).view_as(scale)
            low, high = (-half * scale).flatten(), ((half - 1) * scale).flatten()
            w = m.weight.view(m.weight.shape[0], -1) if m.weight.dim() == 2 else m.weight
            if w.dim() == 4:
                w[:, 0, 0, 0], w[:, -1, -1, -1] = high, low
            else:
                w[:, 0], w[:, -1] = high, low
        layers[1].in_alive[::3] = False
    return model, layers


CASES = [(name, dtype, rb, cl) for name in ("SmallCNN", "ResNet9")
         for dtype in (torch.float32, torch.float64) for rb in (True, False) for cl in (False, True)]


@pytest.mark.parametrize("name,dtype,round_bits,channels_last", CASES)
def test_fused_quantizer_equals_the_reference_bit_for_bit(name, dtype, round_bits, channels_last):
    for seed in range(2):
        model, layers = hard_model(name, dtype, round_bits, channels_last, seed)
        outs = fused.quantized_weights(fused.plan_of(model))
        grads = [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, grads)
        got = [(o.detach(), m.weight.grad, m.b.grad, m.e.grad) for o, m in zip(outs, layers, strict=True)]
        model.zero_grad(set_to_none=True)
        ref = [m._quantized_weight() for m in layers]  # outside a forward pass: the reference
        torch.autograd.backward(ref, grads)
        for i, (m, r, g) in enumerate(zip(layers, ref, got, strict=True)):
            expected = (r.detach(), m.weight.grad, m.b.grad, m.e.grad)
            for what, a, b in zip(("q", "dw", "db", "de"), g, expected, strict=True):
                assert same_bits(a, b), f"layer {i}: {what} differs"


def test_fixed_bits_layers_get_no_bit_gradient_and_equal_weight_gradients():
    model, layers = hard_model("SmallCNN", torch.float32, True, True, 0, method=FixedBits)
    outs = fused.quantized_weights(fused.plan_of(model))
    sum(o.square().sum() for o in outs).backward()
    got = [(m.weight.grad, m.e.grad) for m in layers]
    assert all(m.b.grad is None for m in layers)
    model.zero_grad(set_to_none=True)
    sum(m._quantized_weight().square().sum() for m in layers).backward()
    for (dw, de), m in zip(got, layers, strict=True):
        assert same_bits(dw, m.weight.grad) and same_bits(de, m.e.grad)


@pytest.mark.parametrize("round_bits", [True, False])
def test_fused_size_term_equals_the_reference(round_bits):
    model, layers = hard_model("ResNet9", torch.float32, round_bits, False, 0)
    fixed = size.fixed_bits(model)
    for gamma in (0.1, 0.037):
        (gamma * (q := size.size_loss(model, fixed))).backward()
        got = [m.b.grad.clone() for m in layers]
        model.zero_grad(set_to_none=True)
        (gamma * (q_ref := reference_size_loss(model, fixed))).backward()
        assert same_bits(q, q_ref)
        assert all(same_bits(a, m.b.grad) for a, m in zip(got, layers, strict=True))
        model.zero_grad(set_to_none=True)
    assert float(q.detach()) == pytest.approx(size.report(model).bits_per_weight)


def test_the_bit_depth_group_updates_like_torchs_adamw_bit_for_bit():
    """scn.optim.AdamW's shared-step b and e group against torch's single-tensor AdamW: many
    steps, a changing lr, gradients of every scale, and a state round trip (as resume does)."""
    model, _ = hard_model("SmallCNN", torch.float32, True, False, 0)
    twin = copy.deepcopy(model)
    opt = make_optimizer(model, TrainConfig())
    assert opt.param_groups[1]["shared_step"]
    groups = [{k: v for k, v in g.items() if k != "shared_step"} for g in opt.param_groups]
    by_name = dict(twin.named_parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        g["params"] = [by_name[names[id(p)]] for p in g["params"]]
    opt_ref = torch.optim.AdamW(groups, foreach=False)
    gen = torch.Generator().manual_seed(1)
    pairs = list(zip(model.parameters(), twin.parameters(), strict=True))
    for step in range(400):
        for o in (opt, opt_ref):
            for g, base in zip(o.param_groups, (3e-3, 5e-3), strict=True):
                g["lr"] = base * (1 - step / 400)
        for a, b in pairs:
            scale = 10.0 ** -int(torch.randint(0, 6, (1,), generator=gen))
            a.grad = torch.randn(a.shape, generator=gen) * scale
            b.grad = a.grad.clone()
        opt.step()
        opt_ref.step()
        if step == 200:
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert same_bits(a.detach(), b.detach()), name


def test_a_training_step_equals_the_reference_step_bit_for_bit():
    """Q from the quantizer's own function (what the trainer calls), the forward pass, the loss
    and every parameter's gradient, against the per-layer reference with the per-layer Q."""
    model, layers = hard_model("ResNet9", torch.float32, True, True, 0)
    x, y = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last), torch.arange(4)
    fixed = size.fixed_bits(model)
    plan = size.size_plan(model)
    q = fused.prepare(model, size.fused_inputs(plan, fixed), plan.layers)
    loss = F.cross_entropy(model(x), y) + 0.1 * q
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    hooks = model._forward_pre_hooks.copy()
    model._forward_pre_hooks.clear()  # the reference: each layer quantizes itself
    ref = F.cross_entropy(model(x), y) + 0.1 * reference_size_loss(model, fixed)
    ref.backward()
    model._forward_pre_hooks.update(hooks)
    assert same_bits(q.detach(), reference_size_loss(model, fixed).detach())
    assert same_bits(loss.detach(), ref.detach())
    for n, p in model.named_parameters():
        assert same_bits(got[n], p.grad), n


def test_model_forward_uses_the_fused_weights_and_keeps_them_for_that_pass_only():
    model, layers = hard_model("ResNet9", torch.float32, True, True, 0)
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    # two forward passes before one backward: both graphs hold their own saved tensors
    loss = model(x).square().sum() + model(2 * x).square().sum()
    loss.backward()
    assert all(m.__dict__.get("_scn_step") is None for m in layers)
    got = [m.e.grad.clone() for m in layers]
    model.zero_grad(set_to_none=True)
    for m in layers:  # the reference pass: no hook
        m.__dict__["_scn_step"] = None
    hooks = model._forward_pre_hooks.copy()
    model._forward_pre_hooks.clear()
    ref = model(x).square().sum() + model(2 * x).square().sum()
    ref.backward()
    model._forward_pre_hooks.update(hooks)
    assert torch.allclose(loss, ref, rtol=1e-6)
    assert all(torch.allclose(a, m.e.grad, rtol=1e-4, atol=1e-6) for a, m in zip(got, layers, strict=True))


def test_the_plan_follows_surgery_and_frozen_evaluation():
    model = quantize_(build("SmallCNN", in_channels=1, num_classes=4, width=8),
                      SelfCompress(init_bits=3))
    data = synthetic()
    x = data.normalize(data.test_x[:8])
    graph = surgery.trace(model, x[:1])
    plan = fused.plan_of(model)
    with torch.no_grad():
        model[0].b[:3] = -1.0  # three channels die
    model.eval()
    before = model(x)
    surgery.prune(model, graph, physical=True)
    assert fused.plan_of(model) is not plan  # shapes changed: a new plan
    assert torch.allclose(model(x), before, atol=1e-5)
    with quant.frozen(model):
        assert torch.equal(model(x), model(x))
        assert all("weight" in m.__dict__["_scn_frozen"] for _, m in sc_layers(model) if m.quantized)


def test_layers_of_mixed_dtypes_fall_back_to_the_reference():
    model = quantize_(build("SmallCNN", in_channels=1, num_classes=4, width=4).double(),
                      SelfCompress(init_bits=3))  # weights float64, bit depths float32
    assert fused.plan_of(model) is None
    assert model(torch.randn(2, 1, 28, 28, dtype=torch.float64)).dtype == torch.float64


def test_a_model_on_the_meta_device_runs_the_reference():
    """Shape checks build and run a model on the meta device, where nothing can be read."""
    with torch.device("meta"):
        model = quantize_(build("SmallCNN", in_channels=1, num_classes=4, width=4),
                          SelfCompress(init_bits=3))
        assert model(torch.empty(2, 1, 28, 28)).shape == (2, 4)
    assert fused.plan_of(model) is None


class _Losses(Reporter):
    def __init__(self):
        self.rows = []

    def logged(self, rows):
        self.rows += rows


def test_compiled_training_equals_eager_through_a_surgery():
    """trainer.compile=true with inductor on the CPU: compiled, re-compiled after the surgery."""
    base = quantize_(build("SmallCNN", in_channels=1, num_classes=4, width=8),
                     SelfCompress(init_bits=3))
    losses, results = {}, {}
    for compiled in (False, True):
        torch.manual_seed(1)
        cfg = TrainConfig(max_epochs=20, max_steps=12, batch_size=32, lr_quant=0.3, prune_every=6,
                          eval_every=12, progress=False, compile=compiled, recalibrate_bn=0)
        reporter = _Losses()
        trainer = Trainer(copy.deepcopy(base), synthetic(), cfg, Constant(gamma=2.0), True)
        results[compiled] = trainer.run(reporter)
        losses[compiled] = torch.tensor([r["loss"] for r in reporter.rows])
    assert results[True].surgeries == results[False].surgeries >= 1
    assert torch.allclose(losses[True], losses[False], rtol=1e-4)
    assert results[True].compile_time_s > 0 and results[False].compile_time_s == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_self_compressing_step_does_not_synchronise_the_device():
    model, _ = hard_model("ResNet9", torch.float32, True, True, 0)
    model = model.cuda()
    opt = make_optimizer(model, TrainConfig())
    fixed = size.fixed_bits(model).cuda()
    plan = size.size_plan(model)
    x, y = torch.randn(8, 3, 32, 32, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    for debug in ("default", "error"):
        torch.cuda.set_sync_debug_mode(debug)
        try:
            loss = F.cross_entropy(model(x), y) + 0.1 * size.size_loss(model, fixed, plan)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
