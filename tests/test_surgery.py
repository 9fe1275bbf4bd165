"""Channel surgery: outputs unchanged, optimizer steps unchanged, shapes really smaller."""

import copy

import pytest
import torch
from torch import nn

from scn import size, surgery
from scn.errors import SurgeryError
from scn.methods import Scheme, quantize_
from scn.models import ResNet, SmallCNN
from scn.optim import make_optimizer
from scn.quant import SCConv2d, sc_layers
from scn.train import TrainConfig


def randomize_norms(model):
    """Non-trivial BatchNorm statistics, so dead channels emit real constants through ReLU."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 1)
            m.running_mean.normal_(0, 1)
            m.running_var.uniform_(0.5, 2.0)


def kill(model, fraction, generator, names=None):
    for name, layer in sc_layers(model):
        if layer.quantized and (names is None or name in names):
            dead = torch.rand(layer.b.shape, generator=generator) < fraction
            layer.b.data[dead.to(layer.b.device)] = 0.2  # rounds to 0 bits
    return model


# Surgery must work where users train: the CUDA cases run wherever a GPU is present.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


@pytest.fixture
def exact_cuda():
    """Full float32 on CUDA: TF32 convolutions would blur the 1e-5 comparisons below."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def small_cnn():
    m = quantize_(SmallCNN(width=6), Scheme(init_bits=6))
    randomize_norms(m)
    return m, torch.randn(8, 1, 28, 28)


def resnet():
    m = quantize_(ResNet(width=6, blocks=(2, 2)), Scheme(init_bits=6))
    randomize_norms(m)
    return m, torch.randn(8, 3, 16, 16)


def kill_residual_channel(model, space_index_in_graph, graph, channel):
    """Kill one residual-stream channel in every producer of its space."""
    space = graph.spaces[space_index_in_graph]
    for name in space.producers:
        model.get_submodule(name).b.data[channel] = 0.2


def residual_space(graph):
    return next(i for i, s in enumerate(graph.spaces) if len(s.producers) > 1)


def rel_err(a, b):
    return float(((a - b).abs().max() / b.abs().max()).detach())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("build", [small_cnn, resnet])
@pytest.mark.parametrize("physical", [True, False])
def test_outputs_unchanged(build, physical, device, exact_cuda):
    gen = torch.Generator().manual_seed(1)
    model, x = build()
    model, x = model.to(device), x.to(device)
    graph = surgery.trace(model, x)
    kill(model, 0.4, gen)
    if build is resnet:
        kill_residual_channel(model, residual_space(graph), graph, 1)
    model.eval()
    before = model(x)
    result = surgery.prune(model, graph, physical=physical)
    assert result.total > 0
    assert rel_err(model(x), before) < 1e-5


def test_physical_removal_shrinks_shapes_and_size():
    gen = torch.Generator().manual_seed(2)
    model, x = small_cnn()
    graph = surgery.trace(model, x)
    kill(model, 0.5, gen)
    params_before = size.report(model).param_count
    bits_before = size.report(model).bits_per_weight
    live = {n: int(layer.live_out().sum()) for n, layer in sc_layers(model)}
    surgery.prune(model, graph)
    for name, layer in sc_layers(model)[:-1]:
        assert layer.weight.shape[0] == max(live[name], 1)
    rep = size.report(model)
    assert rep.param_count < params_before and rep.bits_per_weight < bits_before
    assert rep.reference_scalars == size.Reference.of(SmallCNN(width=6)).scalars  # same denominator


@pytest.mark.parametrize("arch", ["small_cnn", "resnet"])
def test_removal_in_multiples_leaves_aligned_channel_counts(arch):
    """multiple=4: every space keeps a multiple of 4 channels (the other dead ones stay,
    masked at 0 bits), the outputs do not change, and later surgeries finish the job."""
    gen = torch.Generator().manual_seed(3)
    if arch == "small_cnn":
        model, x = quantize_(SmallCNN(width=12), Scheme(init_bits=6)), torch.randn(8, 1, 28, 28)
    else:
        model, x = quantize_(ResNet(width=12, blocks=(1, 1)), Scheme(init_bits=6)), torch.randn(8, 3, 16, 16)
    randomize_norms(model)
    graph = surgery.trace(model, x)
    kill(model, 0.45, gen)
    model.eval()
    before = model(x)
    dead_before = size.report(model).dead_channels
    widths_before = [layer.weight.shape[0] for _, layer in sc_layers(model)[:-1]]
    result = surgery.prune(model, graph, multiple=4)
    assert result.total > 0
    assert rel_err(model(x), before) < 1e-5
    widths = [layer.weight.shape[0] for _, layer in sc_layers(model)[:-1]]
    assert all(w % 4 == 0 for w in widths), widths
    assert sum(widths) < sum(widths_before)
    assert 0 < size.report(model).dead_channels < dead_before  # some removed, some only masked
    surgery.prune(model, graph, multiple=1)  # the rest can still go
    assert size.report(model).dead_channels < 4 * len(widths)
    assert rel_err(model(x), before) < 1e-5


def test_linear_after_flatten_loses_whole_blocks():
    model, x = small_cnn()
    graph = surgery.trace(model, x)
    last_conv = sc_layers(model)[-2][1]
    head = sc_layers(model)[-1][1]
    block = head.weight.shape[1] // last_conv.weight.shape[0]
    assert block == 7 * 7
    last_conv.b.data[[0, 3]] = 0.0
    model.eval()
    before = model(x)
    surgery.prune(model, graph)
    assert head.weight.shape[1] == (last_conv.weight.shape[0]) * block
    assert head.in_features == head.weight.shape[1]
    assert rel_err(model(x), before) < 1e-5


@pytest.mark.parametrize("build", [small_cnn, resnet])
def test_all_dead_layer_keeps_one_channel(build):
    model, x = build()
    graph = surgery.trace(model, x)
    space = next(s for s in graph.spaces if not s.protected and s.producers and len(s.producers) == 1)
    layer = model.get_submodule(space.producers[0])
    layer.b.data[:] = 0.1
    layer.b.data[2] = 0.4  # the "least dead" stays
    model.eval()
    before = model(x)
    surgery.prune(model, graph)
    assert layer.weight.shape[0] == 1
    assert rel_err(model(x), before) < 1e-5
    assert surgery.prune(model, graph).total == 0  # nothing more to do, no crash


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("build", [small_cnn, resnet])
def test_one_optimizer_step_equals_masked_model(build, device, exact_cuda):
    gen = torch.Generator().manual_seed(3)
    model, x = build()
    model, x = model.to(device), x.to(device)
    y = torch.randint(0, 10, (len(x),), device=device)
    graph = surgery.trace(model, x)
    cfg = TrainConfig(lr=1e-2, lr_quant=0.05)

    def step(m, opt):
        loss = nn.functional.cross_entropy(m(x), y) + 0.01 * size.size_loss(m)
        opt.zero_grad()
        loss.backward()
        opt.step()

    model.train()
    opt = make_optimizer(model, cfg)
    step(model, opt)  # optimizer state exists before surgery
    kill(model, 0.4, gen)
    if build is resnet:
        kill_residual_channel(model, residual_space(graph), graph, 0)
    masked, opt_masked = copy.deepcopy((model, opt))  # the copy's optimizer holds the copy's params
    result = surgery.prune(model, graph, physical=True, optimizer=opt)
    surgery.prune(masked, graph, physical=False, optimizer=opt_masked)
    assert result.total > 0
    step(model, opt)
    step(masked, opt_masked)

    shrunk = dict(model.named_parameters())
    for name, full in masked.named_parameters():
        module, _, attr = name.rpartition(".")
        expected = full.detach()
        if module in result.kept_out:
            expected = expected.index_select(0, result.kept_out[module].to(device))
        if module in result.kept_in and attr == "weight":
            expected = expected.index_select(1, result.kept_in[module].to(device))
        assert shrunk[name].shape == expected.shape, name
        assert torch.allclose(shrunk[name], expected, rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("build", [small_cnn, resnet])
def test_training_with_removal_is_the_masked_run(build):
    """Many steps and several surgeries in lockstep, in float64: removal drops only zeros and
    what folds exactly, so the two runs stay one run. (In float32 their round-off differs from
    the first surgery on, and a long noisy run then drifts apart: see bench_removal.py.)"""
    model, x = build()
    model = model.double()
    gen = torch.Generator().manual_seed(5)
    for _, layer in sc_layers(model):  # staggered bit depths: channels die at different surgeries
        if layer.quantized:
            layer.b.data = torch.empty(layer.b.shape, dtype=torch.float64).uniform_(0.6, 4, generator=gen)
    graph = surgery.trace(model, x.double())
    runs = {"masked": model, "physical": copy.deepcopy(model)}
    opts = {k: make_optimizer(m, TrainConfig(lr=1e-2, lr_quant=0.2)) for k, m in runs.items()}
    removals = []
    for step in range(1, 31):
        xb = torch.randn(16, *x.shape[1:], generator=gen, dtype=torch.float64)
        yb = torch.randint(0, 10, (16,), generator=gen)
        losses = {}
        for name, m in runs.items():
            m.train()
            task = nn.functional.cross_entropy(m(xb), yb)
            opts[name].zero_grad()
            (task + size.size_loss(m).double()).backward()
            opts[name].step()
            losses[name] = task.item()
        # The size terms differ by a constant (the masked model still stores the dead channels'
        # biases, norms and bit depths); constants have no gradient, so the runs are the same.
        assert losses["physical"] == pytest.approx(losses["masked"], rel=1e-10), step
        if step % 5 == 0:
            for name, m in runs.items():
                surgery.settle_norms(m, graph)
                result = surgery.prune(m, graph, physical=name == "physical", optimizer=opts[name])
            removals.append(result.total)
    assert sum(n > 0 for n in removals[:-1]) >= 2, removals  # steps ran after several removals
    assert size.report(runs["physical"]).param_count < size.report(runs["masked"]).param_count
    for m in runs.values():
        m.eval()
    assert rel_err(runs["physical"](x.double()), runs["masked"](x.double())) < 1e-10


def test_unsupported_model_is_a_clear_error():
    class ChannelMean(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(1, 2, 3)
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            return self.head(self.a(x).mean(1).flatten(1)[:, :6])

    model = quantize_(ChannelMean(), Scheme())
    with pytest.raises(SurgeryError, match="mean over other than the spatial"):
        surgery.trace(model, torch.randn(1, 1, 8, 8))


def test_grouped_conv_keeps_its_channels_and_counts_its_real_weights():
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2),
                        nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    model = quantize_(net, Scheme(init_bits=4, quantize_first=True))
    grouped = model[2]
    assert grouped.weight.shape == (8, 4, 3, 3)
    assert size.report(model).weights_stored == sum(m.weight.numel() for _, m in sc_layers(model))
    for layer in (model[0], grouped):
        layer.b.data[:3] = 0.2  # dead, but a cut would leave the groups unequal
    graph = surgery.trace(model, torch.randn(1, 1, 8, 8))
    assert surgery.prune(model, graph).total == 0
    assert model[0].weight.shape[0] == 8 and grouped.weight.shape == (8, 4, 3, 3)


def test_constant_of_a_dead_channel_is_folded_exactly_at_borders():
    # One producer channel dies; its BN bias through ReLU is a constant image that the padded
    # consumer sees with zero padding: the folded kernel must reproduce the border values.
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2), nn.ReLU(),
                        nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 5 * 5, 2))
    quantize_(net, Scheme())
    net[1].bias.data[:] = torch.tensor([2.0, 3.0])
    net[0].b.data[1] = 0.0
    graph = surgery.trace(net, torch.randn(1, 1, 5, 5))
    net.eval()
    x = torch.randn(4, 1, 5, 5)
    before = net(x)
    surgery.prune(net, graph)
    assert isinstance(net[3], SCConv2d) and net[3].weight.shape[1] == 1
    assert net[3].input_offset.shape == (3, 1, 3, 3)
    assert rel_err(net(x), before) < 1e-6


def test_dead_channel_carrying_an_earlier_fold_is_kept_not_broken():
    # conv_a -> BN -> ReLU -> conv_b -> BN -> ReLU -> conv_c. First a channel of conv_a dies:
    # its constant is folded into conv_b through zero padding, so conv_b's outputs now vary at
    # the borders even where conv_b's weights are zero. Then a conv_b channel dies: its image
    # is not uniform, so it cannot fold exactly into conv_c and must stay (at 0 bits).
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2), nn.ReLU(),
                        nn.Conv2d(2, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2), nn.ReLU(),
                        nn.Conv2d(2, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 5 * 5, 2))
    quantize_(net, Scheme())
    randomize_norms(net)
    net[1].bias.data[:] = 2.0
    net[4].bias.data[:] = 2.0
    graph = surgery.trace(net, torch.randn(1, 1, 5, 5))
    net.eval()
    x = torch.randn(4, 1, 5, 5)
    net[0].b.data[1] = 0.0
    assert surgery.prune(net, graph).total == 1
    net[3].b.data[0] = 0.0
    before = net(x)
    result = surgery.prune(net, graph)
    assert result.kept_nonuniform == 1 and result.total == 0
    assert net[3].weight.shape[0] == 2
    assert rel_err(net(x), before) < 1e-5


def test_settled_norms_make_eval_agree_with_training_for_dead_channels():
    # A channel dies; its BatchNorm still holds the running mean of the live channel. In train
    # mode the channel outputs exactly the BatchNorm bias; after settling, eval mode does too.
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(3 * 6 * 6, 2))
    quantize_(net, Scheme())
    randomize_norms(net)
    net[0].b.data[1] = 0.0
    graph = surgery.trace(net, torch.randn(1, 1, 6, 6))
    x = torch.randn(5, 1, 6, 6)
    assert surgery.settle_norms(net, graph) == 1
    assert surgery.settle_norms(net, graph) == 0  # nothing stale any more
    train_out = net[1].train()(net[0](x))[:, 1]
    eval_out = net[1].eval()(net[0](x))[:, 1]
    assert torch.allclose(train_out, eval_out)
    assert torch.allclose(eval_out, net[1].bias[1].expand_as(eval_out))
    live = net[1].running_mean[[0, 2]].clone()
    surgery.settle_norms(net, graph)
    assert torch.equal(net[1].running_mean[[0, 2]], live)  # live channels untouched
