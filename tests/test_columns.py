"""The live-input charge (scn/columns.py): Q's value stays the file's size, and its gradient is
the derivative of the paper's Q with the live-input counts made straight-through functions of
the producers' bit depths, written out layer by layer here. Then quant.channel_price=uniform:
every live channel gets the mean of that pull, so the total is unchanged."""

import pytest
import torch
import torch.nn.functional as F

from scn import fused, size, surgery
from scn.errors import ConfigError
from scn.experiment import _hashed
from scn.methods import SelfCompress, quantize_
from scn.models import build
from scn.quant import round_ste, sc_layers


def converted(name: str, seed: int = 0, spread: str = "flat"):
    torch.manual_seed(seed)
    image = 28 if name == "SmallCNN" else 32
    model = build(name, in_channels=1 if name == "SmallCNN" else 3, num_classes=10, width=8,
                  image_size=image)
    model = quantize_(model, SelfCompress(live_input_grad=0.7, live_input_spread=spread))
    gen = torch.Generator().manual_seed(seed)
    for _, m in sc_layers(model):  # spread bit depths over 1..5, a few channels dead
        m.b.data = torch.randint(1, 6, m.b.shape, generator=gen).float() + 0.3
        m.b.data[torch.rand(m.b.shape, generator=gen) < 0.15] = -0.2
    x = torch.randn(2, 1 if name == "SmallCNN" else 3, image, image)
    return model, x


def explicit_q(model, graph, weight: float, spread: str, charges: dict | None = None) -> torch.Tensor:
    """sum_l I_l * kernel * sum_i B_li over the scalars, I_l counting each live input channel
    as [B > 0] + weight * (b - b.detach()) shared among the channel's live producers (divided
    by the producer's bits B with the per_bit spread). `charges` scales each layer's term's
    gradient (not its value) by the layer's charge (the FLOPs charge)."""
    layers = dict(sc_layers(model))
    inputs = {name: m.in_alive.sum().float() for name, m in layers.items()}  # the counts' values
    for space in graph.spaces:
        if not space.producers:  # the model's input
            continue
        live = torch.stack([layers[p].live_out().float() for p in space.producers])
        count = live.sum(0).clamp(min=1)
        per_bit = [layers[p].int_bits().clamp(min=1) if spread == "per_bit" else 1
                   for p in space.producers]
        ste = sum(live[i] * weight * (layers[p].b - layers[p].b.detach()) / count / per_bit[i]
                  for i, p in enumerate(space.producers))
        for name, block, _ in space.consumers:
            inputs[name] = inputs[name] + block * ste.sum()
    total = size.fixed_bits(model).float()
    for name, m in layers.items():
        bits = round_ste(m.b).clamp(0, 16)
        term = inputs[name] * m.kernel_numel() * bits.sum()
        scale = (charges or {}).get(name, 1.0)
        total = total + term + (scale - 1) * (term - term.detach())
    return total / size.reference_of(model).scalars


@pytest.mark.parametrize("name", ["SmallCNN", "ResNet9"])
@pytest.mark.parametrize("path", ["fused", "per_layer"])
@pytest.mark.parametrize("spread", ["flat", "per_bit"])
@pytest.mark.parametrize("flops", [0.0, 3.0])
def test_the_charge_is_the_derivative_of_the_live_input_counts(name, path, spread, flops):
    """With the FLOPs charge (scn/flops_charge.py) each layer's term, its own weights and the
    columns its producers keep alive in it, pulls 1 + 3 x its output positions / the largest
    layer's times as hard."""
    model, x = converted(name, spread=spread)
    graph = surgery.trace(model, x)
    model.scn_scheme.flops_charge = flops
    term = model.scn_scheme.attach(model, None)
    term.fuse = path == "fused"
    term.refresh(torch.device("cpu"), graph)
    q = term.term()
    F.cross_entropy(model(x), torch.arange(2)).mul(0).add(q).backward()
    got = {n: m.b.grad.clone() for n, m in sc_layers(model)}
    model.zero_grad(set_to_none=True)
    top = max(graph.positions.values())
    charges = {n: 1 + flops * p / top for n, p in graph.positions.items()}
    want = explicit_q(model, graph, 0.7, spread, charges)
    want.backward()
    assert torch.allclose(q.detach(), want.detach().double().float(), rtol=1e-6)
    assert q.item() == pytest.approx(size.report(model).bits_per_weight, rel=1e-6)
    for n, m in sc_layers(model):
        live = m.live_out() & (m.int_bits() < 16)
        assert torch.allclose(got[n][live], m.b.grad[live], rtol=1e-5, atol=1e-9), n
        assert not got[n][~live].any(), n  # dead channels stay dead


def test_the_graph_knows_each_layers_output_positions():
    """The FLOPs charge's P_l: a convolution's output pixels per example, 1 for the classifier."""
    model, x = converted("SmallCNN")
    graph = surgery.trace(model, x)
    assert graph.positions == {"0": 784, "3": 784, "7": 196, "10": 196, "15": 1}


def test_no_charge_leaves_the_term_as_it_was():
    model, x = converted("ResNet9")
    graph = surgery.trace(model, x)
    grads = []
    for charge in (None, 0.0):
        term = SelfCompress(live_input_grad=0.0).attach(model, None)
        term.refresh(torch.device("cpu"), graph if charge is not None else None)
        assert term.plan.columns is None
        model.zero_grad(set_to_none=True)
        q = term.term()
        fused.after_forward(model, None, None)
        q.backward()
        grads.append(torch.cat([m.b.grad for _, m in sc_layers(model)]))
    assert torch.equal(grads[0], grads[1])


def test_the_last_convolution_is_charged_more_than_its_own_weights():
    """The last convolution's channels each keep a classifier column alive (one input per
    output class and pixel), which costs more than the channel's own weights; the classifier's
    outputs feed nothing and are charged nothing."""
    model, x = converted("SmallCNN")
    graph = surgery.trace(model, x)
    term = model.scn_scheme.attach(model, None)
    term.refresh(torch.device("cpu"), graph)
    extra = term.plan.columns.factor(torch.cat([m.int_bits().float() for m in term.plan.layers]))
    sizes = [m.b.shape[0] for m in term.plan.layers]
    own = term.plan.weight_b.split(sizes)
    charged = extra.split(sizes)
    last_conv = len(sizes) - 2
    live = term.plan.layers[last_conv].live_out()
    assert (charged[last_conv][live] > own[last_conv][live]).all()
    assert not charged[-1].any()  # the classifier's outputs feed nothing


def test_a_charged_run_keeps_its_charge_through_surgery():
    """The trainer hands the channel graph to the size term, and every surgery rebuilds the
    charge for the new shapes: a short charged run removes channels and ends with a charge
    sized to the shrunk network."""
    from scn.data import synthetic
    from scn.schedule import Constant
    from scn.train import TrainConfig, Trainer

    net = build("SmallCNN", in_channels=1, num_classes=4, width=8)
    net = quantize_(net, SelfCompress(live_input_grad=1.0, live_input_spread="per_bit"))
    cfg = TrainConfig(max_epochs=20, max_steps=40, batch_size=64, lr_quant=0.3, prune_every=5,
                      eval_every=40, progress=False)
    trainer = Trainer(net, synthetic(), cfg, Constant(gamma=2.0), learn_bits=True)
    result = trainer.run()
    assert result.surgeries > 0
    columns = trainer.size.plan.columns
    channels = sum(m.b.shape[0] for m in trainer.size.plan.layers)
    assert columns.share.shape[0] == columns.consumers.shape[1] == channels
    assert columns.per_bit


def test_the_flops_charge_is_validated_and_neutral_in_the_config_hash():
    """A negative charge is refused; at 0 it is left out of the run's hash (runs made before
    it existed keep theirs)."""
    with pytest.raises(ConfigError, match="quant.flops_charge"):
        SelfCompress(flops_charge=-1.0)
    assert _hashed({"quant": {"flops_charge": 0.0}}) == _hashed({"quant": {}})
    assert _hashed({"quant": {"flops_charge": 4.0}}) != _hashed({"quant": {}})


def q_and_grad(model, graph, price: str, fuse: bool) -> tuple[float, torch.Tensor]:
    model.scn_scheme.channel_price = price
    term = model.scn_scheme.attach(model, None)
    term.fuse = fuse
    term.refresh(torch.device("cpu"), graph)
    model.zero_grad(set_to_none=True)
    q = term.term()
    fused.after_forward(model, None, None)
    q.backward()
    return q.item(), torch.cat([m.b.grad for _, m in sc_layers(model)])


@pytest.mark.parametrize("name", ["SmallCNN", "ResNet9"])
@pytest.mark.parametrize("fuse", [True, False])
def test_a_uniform_price_shares_the_pull_of_q_equally(name, fuse):
    model, x = converted(name, spread="per_bit")
    graph = surgery.trace(model, x)
    q_bits, by_bits = q_and_grad(model, graph, "bits", fuse)
    q_uniform, uniform = q_and_grad(model, graph, "uniform", fuse)
    live = torch.cat([m.live_out() for _, m in sc_layers(model)])
    assert q_uniform == q_bits == pytest.approx(size.report(model).bits_per_weight, rel=1e-6)
    assert not by_bits[live].eq(by_bits[live][0]).all()  # Q's own pull differs among channels
    assert torch.allclose(uniform[live], by_bits[live].mean().expand(int(live.sum())), rtol=1e-5)
    assert not uniform[~live].any()  # dead channels stay dead


def test_the_price_is_validated_and_neutral_in_the_config_hash():
    """An unknown price is refused with the choices; "bits" (Q's gradient) is left out of the
    run's hash, so runs made before the option keep theirs."""
    with pytest.raises(ConfigError, match="quant.channel_price='flops'.*bits, uniform"):
        SelfCompress(channel_price="flops")
    assert _hashed({"quant": {"channel_price": "bits"}}) == _hashed({"quant": {}})
    assert _hashed({"quant": {"channel_price": "uniform"}}) != _hashed({"quant": {}})
