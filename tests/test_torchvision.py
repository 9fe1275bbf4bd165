"""torchvision networks end to end: convert, trace, cut dead channels, save, load into a skeleton."""

import pytest
import torch

torchvision = pytest.importorskip("torchvision")

import check_torchvision  # noqa: E402  (scripts/, on the path through conftest)

from scn import size, surgery  # noqa: E402
from scn.data import synthetic  # noqa: E402
from scn.errors import FormatError, SurgeryError  # noqa: E402
from scn.format import load, save  # noqa: E402
from scn.methods import Scheme, quantize_  # noqa: E402
from scn.models import build  # noqa: E402
from scn.schedule import Constant  # noqa: E402
from scn.train import TrainConfig, train  # noqa: E402

fresh = check_torchvision.fresh
ARCHS = ["resnet18", "mobilenet_v2", "efficientnet_b0", "densenet121", "regnet_x_400mf"]


@pytest.mark.parametrize("arch", ARCHS)
def test_cut_keeps_outputs_and_loads_into_a_skeleton(arch):
    """scripts/check_torchvision.py's check: random 30% of channels at 0 bits, traced, cut,
    eval outputs compared (1e-5 relative), saved and loaded into a fresh skeleton exactly."""
    record = check_torchvision.check(arch, max_params=1e9)
    assert record["ok"], record
    assert record["relative_error"] < 1e-5 and record["reload_equal"]
    assert record["params_after"] < record["params_before"]
    assert record["flops_after"] < record["flops_before"]


def test_a_foreign_model_needs_its_skeleton(tmp_path):
    model = check_torchvision.killed(fresh("resnet18"))
    x = torch.randn(2, 3, 32, 32)
    graph = surgery.trace(model, x)
    surgery.settle_norms(model, graph)
    surgery.prune(model, graph, physical=True)
    path = tmp_path / "resnet18.scn"
    save(model, path, input_shape=(3, 32, 32))
    with pytest.raises(FormatError, match="skeleton|build the same architecture"):
        load(path)
    loaded, _ = load(path, model=fresh("resnet18"))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()}


def test_depthwise_channel_leaves_with_the_channel_that_feeds_it():
    model = quantize_(fresh("mobilenet_v2"), Scheme(init_bits=6)).eval()
    block = model.features[2].conv  # expand 1x1 -> depthwise 3x3 -> project 1x1
    expand, depthwise, project = block[0][0], block[1][0], block[2]
    depthwise.b.data[:5] = 0.2  # dead depthwise channels: their input channels go too
    graph = surgery.trace(model, torch.randn(1, 3, 32, 32))
    surgery.settle_norms(model, graph)
    surgery.prune(model, graph, physical=True)
    assert expand.weight.shape[0] == depthwise.weight.shape[0] == project.weight.shape[1] == 91
    assert depthwise.groups == depthwise.in_channels == 91


def test_unsupported_network_is_a_clear_error():
    model = quantize_(fresh("convnext_tiny"), Scheme())
    with pytest.raises(SurgeryError, match="graph node"):
        surgery.trace(model, torch.randn(1, 3, 32, 32))


def test_mobilenet_trains_through_a_surgery():
    model = quantize_(build("torchvision", arch="mobilenet_v2", in_channels=1, num_classes=4,
                            small_input=True), Scheme(init_bits=3))
    params = size.report(model).param_count
    cfg = TrainConfig(max_epochs=1, max_steps=6, batch_size=16, lr_quant=0.5, prune_every=3,
                      eval_every=6, progress=False)
    data = synthetic(num_train=96, num_test=32, image_size=16)
    result = train(model, data, cfg, Constant(gamma=20.0))
    assert result.surgeries > 0 and size.report(model).param_count < params
    assert torch.isfinite(torch.tensor(result.history[-1]["test_accuracy"]))
