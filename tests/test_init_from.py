"""model.init_from (a trained float start) and model=torchvision, as a user runs them."""

import pytest
import torch
from safetensors.torch import save_file

from scn.cli import build_experiment
from scn.errors import ConfigError
from scn.evaluation import evaluate
from scn.format import load
from scn.models import build
from scn.sweep import compose_config, run_overrides

SMOKE = ["dataset=synthetic", "trainer.max_steps=4", "trainer.eval_every=4"]


@pytest.fixture(scope="module")
def float_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("float") / "run"
    run_overrides([*SMOKE, "quant=none"], run)
    return run


def test_a_float_runs_weights_start_the_model(float_run):
    path = float_run / "model.safetensors"
    model = build("SmallCNN", init_from=str(path), in_channels=1, num_classes=4, width=16)
    fresh = build("SmallCNN", in_channels=1, num_classes=4, width=16)
    from safetensors.torch import load_file

    stored = load_file(str(path))
    state = model.state_dict()
    assert torch.equal(state["0.weight"], stored["0.weight"])
    assert not torch.equal(fresh.state_dict()["0.weight"], stored["0.weight"])
    assert all(torch.equal(state[k], stored[k]) for k in state)


def test_fine_tune_run_from_a_float_run(float_run, tmp_path):
    summary = run_overrides([*SMOKE, "+experiment=fashion_mnist_finetune",
                             f"model.init_from={float_run / 'model.safetensors'}"], tmp_path / "ft")
    assert summary["status"] == "finished" and summary["bits_per_weight"] < 32
    assert summary["config"]["model"]["init_from"].endswith("model.safetensors")


def test_torch_file_under_a_state_dict_key(tmp_path):
    source = build("SmallCNN", in_channels=1, num_classes=4, width=8)
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, tmp_path / "float.pt")
    model = build("SmallCNN", init_from=str(tmp_path / "float.pt"), in_channels=1, num_classes=4, width=8)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


def test_quantized_state_is_refused(tmp_path):
    run = tmp_path / "sc"
    run_overrides(SMOKE, run)
    with pytest.raises(ConfigError, match="quantized scn model.*resume"):
        build("SmallCNN", init_from=str(run / "model.safetensors"), in_channels=1, num_classes=4)


@pytest.mark.parametrize("make,message", [
    (lambda p: None, "is not a file"),
    (lambda p: p.write_bytes(b"not a state dict"), "cannot be read as a state dict"),
    (lambda p: save_file({"x.weight": torch.zeros(2)}, str(p)), r"not a state dict of this model \(missing"),
])
def test_wrong_files_say_what_to_do(tmp_path, make, message):
    path = tmp_path / "start.safetensors"
    make(path)
    with pytest.raises(ConfigError, match=message):
        build_experiment(compose_config(["dataset=synthetic", f"model.init_from={path}"]))


def test_other_width_is_named(float_run):
    with pytest.raises(ConfigError, match="other shapes for"):
        build("SmallCNN", init_from=str(float_run / "model.safetensors"), in_channels=1,
              num_classes=4, width=8)


def test_torchvision_model_from_the_command_line(tmp_path):
    run = tmp_path / "tv"
    summary = run_overrides(["model=torchvision", "model.name=mobilenet_v2", "dataset=synthetic",
                             "dataset.image_size=16", "trainer.max_steps=6", "trainer.prune_every=3",
                             "trainer.eval_every=6", "trainer.lr_quant=0.5", "size_loss=constant",
                             "size_loss.gamma=20"], run)
    assert summary["status"] == "finished" and summary["weights_left_pct"] < 100
    model, header = load(run / "model.scn")  # scn's registry rebuilds it: no skeleton needed
    assert header["model"]["kwargs"]["arch"] == "mobilenet_v2"
    from scn.data import synthetic

    accuracy, _ = evaluate(model, synthetic(image_size=16))
    assert accuracy == pytest.approx(summary["test_accuracy"], abs=1e-9)


def test_unknown_torchvision_builder_is_a_config_error():
    with pytest.raises(ConfigError, match="not a torchvision classification builder"):
        build_experiment(compose_config(["model=torchvision", "model.name=resnet7",
                                         "dataset=synthetic"]))
