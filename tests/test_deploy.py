"""Leaving with the result: entropy-coded .scn files, ONNX exports, TensorBoard logs."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from safetensors.numpy import load as st_load
from test_format import data, dataset_info, randomize_norms, set_random_bits, trained, weights_equal  # noqa: F401
from test_image_folder import cfg

from scn import entropy, eval_cli
from scn import experiment as scn_experiment
from scn import format as fmt
from scn.cli import build_experiment
from scn.errors import FormatError
from scn.methods import Scheme, quantize_
from scn.models import build
from scn.onnx_export import compare, export_onnx
from scn.quant import sc_layers


def peaked_model(seed=0, width=8, bits=(1, 6)):
    """A SmallCNN whose codes are far from uniform (most weights near 0): coding pays."""
    gen = torch.Generator().manual_seed(seed)
    model = quantize_(build("SmallCNN", in_channels=1, num_classes=4, width=width), Scheme(init_bits=6))
    set_random_bits(model, gen, *bits)
    with torch.no_grad():
        for _, layer in sc_layers(model):
            keep = torch.rand(layer.weight.shape, generator=gen) < 0.15
            layer.weight.mul_(keep)
    randomize_norms(model, gen)
    return model.eval()


def test_entropy_coded_file_is_smaller_and_decodes_bit_exactly(tmp_path, data):  # noqa: F811
    model = peaked_model()
    plain = fmt.save(model, tmp_path / "plain.scn", dataset_info(data))
    coded = fmt.save(model, tmp_path / "coded.scn", dataset_info(data), entropy_coded=True)
    assert coded < 0.8 * plain
    header = fmt.read_header(tmp_path / "coded.scn")
    assert header["version"] == 2 and header["coding"] == {"codes": entropy.CODING}
    assert fmt.read_header(tmp_path / "plain.scn")["version"] == 1
    a, _ = fmt.load(tmp_path / "plain.scn")
    b, _ = fmt.load(tmp_path / "coded.scn")
    weights_equal(a, b)
    x = data.normalize(data.test_x[:64])
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    stats = fmt.file_stats(tmp_path / "coded.scn")
    assert stats["file_bytes"] == coded
    assert stats["payload_bytes"] < fmt.file_stats(tmp_path / "plain.scn")["payload_bytes"]


@pytest.mark.parametrize("fill", ["zero", "one_value", "dead_channels"])
def test_entropy_round_trip_of_degenerate_layers(fill):
    model = peaked_model(seed=3)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i, (_, layer) in enumerate(sc_layers(model)):
            if fill == "zero" and i % 2 == 0:
                layer.weight.zero_()
            elif fill == "one_value" and i % 2 == 0:  # every code the same (1), one symbol per group
                layer.weight.copy_(torch.exp2(torch.round(layer.e)).view(-1, *[1] * (layer.weight.dim() - 1))
                                   .expand_as(layer.weight))
                layer.b.fill_(3)
            elif fill == "dead_channels":
                layer.b.mul_(torch.rand(layer.b.shape, generator=gen) < 0.5)
                layer.b[0] = 2  # every layer keeps a channel
    packed = fmt.encode(model)
    coded = entropy.compress(packed.tensors, packed.layers)
    assert "codes" not in coded and coded[entropy.WORDS].dtype == np.uint32
    back = entropy.expand(coded, packed.layers)
    assert np.array_equal(back["codes"], packed.tensors["codes"])
    assert set(back) == set(packed.tensors)


def independent_decode(raw: bytes) -> dict[str, np.ndarray]:
    """The integer codes of each quantized layer, from docs/format.md's section on the
    entropy-coded payload alone (constriction, safetensors.numpy, the header's tables)."""
    import constriction

    n = int.from_bytes(raw[:8], "little")
    header = json.loads(json.loads(raw[8:8 + n])["__metadata__"]["scn"])
    tensors = st_load(raw)
    coder = constriction.stream.stack.AnsCoder(tensors["codes_ans"])
    counts, at, pos, out = tensors["code_counts"].astype(np.float64), 0, 0, {}
    for layer in header["layers"]:
        if not layer["quantized"]:
            continue
        o = layer["shape"][0]
        m = layer["live_inputs"] * math.prod(layer["shape"][2:])
        bits = tensors["bits"][pos:pos + o].astype(int)
        pos += o
        q = np.zeros((o, m), dtype=np.int64)
        for b in sorted(set(bits.tolist()) - {0}):
            table = counts[at:at + 2 ** b]
            at += 2 ** b
            model = constriction.stream.model.Categorical(table / table.sum(), perfect=False)
            u = coder.decode(model, int((bits == b).sum()) * m)
            q[bits == b] = u.reshape(-1, m) - 2 ** (b - 1)
        out[layer["name"]] = q
    return out


def test_spec_decoder_agrees_with_scn(tmp_path, data):  # noqa: F811
    model = peaked_model(seed=5, bits=(0, 7))
    fmt.save(model, tmp_path / "m.scn", dataset_info(data), entropy_coded=True)
    assert fmt.read_header(tmp_path / "m.scn")["version"] == 2
    theirs = independent_decode((tmp_path / "m.scn").read_bytes())
    loaded, _ = fmt.load(tmp_path / "m.scn")
    for name, layer in sc_layers(loaded):
        if not layer.quantized:
            continue
        exps = torch.where(layer.int_bits() > 0, layer.int_exponents(), 0).float()
        w = layer.effective_weight()[:, layer.in_alive].flatten(1)
        ours = (w / torch.exp2(exps).view(-1, 1)).to(torch.int64).numpy()
        assert np.array_equal(theirs[name], ours), name


def test_unknown_or_inconsistent_coding_is_refused(tmp_path, data):  # noqa: F811
    from safetensors.numpy import save as st_save

    from scn import container

    fmt.save(peaked_model(), tmp_path / "m.scn", dataset_info(data), entropy_coded=True)
    header = fmt.read_header(tmp_path / "m.scn")
    tensors = st_load((tmp_path / "m.scn").read_bytes())
    cases = [({**header, "coding": {"codes": "zstd"}}, "does not decode"),
             ({**header, "version": 1}, "version 2 and only that"),
             ({k: v for k, v in header.items() if k != "coding"}, "version 2 and only that")]
    for changed, match in cases:
        (tmp_path / "other.scn").write_bytes(container.write(st_save, tensors, changed))
        with pytest.raises(FormatError, match=match):
            fmt.load(tmp_path / "other.scn")
    counts = dict(tensors)
    counts[entropy.COUNTS] = counts[entropy.COUNTS].copy()
    counts[entropy.COUNTS][0] += 1
    (tmp_path / "other.scn").write_bytes(container.write(st_save, counts, header))
    with pytest.raises(FormatError, match="symbol counts"):
        fmt.load(tmp_path / "other.scn")


def test_entropy_coding_falls_back_to_plain_when_it_would_grow(tmp_path, data):  # noqa: F811
    gen = torch.Generator().manual_seed(2)
    model = quantize_(build("SmallCNN", in_channels=1, num_classes=4, width=4), Scheme(init_bits=1))
    with torch.no_grad():  # 1-bit codes -1 and 0, equally often: nothing to gain, tables to pay
        for _, layer in sc_layers(model):
            scale = torch.exp2(torch.round(layer.e)).view(-1, *[1] * (layer.weight.dim() - 1))
            layer.weight.copy_(-scale * torch.randint(0, 2, layer.weight.shape, generator=gen))
    coded = fmt.save(model, tmp_path / "m.scn", dataset_info(data), entropy_coded=True)
    assert coded == fmt.save(model, tmp_path / "p.scn", dataset_info(data))
    assert fmt.read_header(tmp_path / "m.scn")["version"] == 1


# ---------------------------------------------------------------------------------------------
# ONNX


def onnx_check(model, path, x, form, **kw):
    nbytes = export_onnx(model, path, form, tuple(x.shape[1:]), **kw)
    assert nbytes == path.stat().st_size
    return nbytes


@pytest.mark.parametrize("name,shape", [("SmallCNN", (1, 28, 28)), ("ResNet9", (3, 32, 32))])
def test_onnx_forms_match_scn(tmp_path, name, shape):
    gen = torch.Generator().manual_seed(4)
    model = quantize_(build(name, in_channels=shape[0], num_classes=10, width=16), Scheme(init_bits=6))
    set_random_bits(model, gen, 0, 4)  # int4 layers, some channels dead
    first = sc_layers(model)[0][1]
    first.b.data[0] = 6  # and one int8 layer
    randomize_norms(model, gen)
    fmt.save(model.eval(), tmp_path / "m.scn", {"name": "synthetic", "classes": list("abcdefghij"),
                                                "input_shape": list(shape)})
    loaded, _ = fmt.load(tmp_path / "m.scn")
    x = torch.randn((40, *shape), generator=gen)
    sizes = {}
    for form in ("float", "qdq"):
        sizes[form] = onnx_check(loaded, tmp_path / f"{form}.onnx", x, form)
        r = compare(tmp_path / f"{form}.onnx", loaded, x)
        assert r["onnx_equal_predictions"] == 1.0 and r["onnx_max_logit_diff"] < 1e-3
    assert sizes["qdq"] < 0.3 * sizes["float"]
    import onnx

    graph = onnx.load(tmp_path / "qdq.onnx").graph
    dequantized = [n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"]
    assert dequantized == [f"{k}.weight" for k, _ in sc_layers(loaded)]
    assert b"/" not in b"".join(n.doc_string.encode() for n in graph.node)  # no source paths


def test_onnx_of_a_trained_model_with_folded_inputs_and_normalization(tmp_path, trained, data):  # noqa: F811
    model, path = trained
    loaded, header = fmt.load(path)
    assert any(layer.input_offset.numel() for _, layer in sc_layers(loaded)), "needs folded inputs"
    x = data.normalize(data.test_x)
    onnx_check(loaded, tmp_path / "m.onnx", x, "qdq")
    assert compare(tmp_path / "m.onnx", loaded, x)["onnx_equal_predictions"] == 1.0
    norm = {"mean": data.mean.tolist(), "std": data.std.tolist()}
    onnx_check(loaded, tmp_path / "n.onnx", x, "qdq", normalization=norm)
    r = compare(tmp_path / "n.onnx", loaded, x, data.test_x.float() / 255)
    assert r["onnx_equal_predictions"] > 0.99 and r["onnx_max_logit_diff"] < 1e-3


def test_scn_eval_writes_onnx_and_entropy_coded_files(tmp_path, trained, capsys):  # noqa: F811
    _, path = trained
    argv = [str(path), "--json", "--onnx", str(tmp_path / "m.onnx"),
            "--entropy-code", str(tmp_path / "e.scn")]
    assert eval_cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["onnx_equal_predictions"] == 1.0 and out["onnx_bytes"] == (tmp_path / "m.onnx").stat().st_size
    assert out["entropy_coded_bytes"] == (tmp_path / "e.scn").stat().st_size
    assert eval_cli.main([str(tmp_path / "e.scn"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test_accuracy"] == out["test_accuracy"]
    assert eval_cli.main(argv) == 2 and "already exists" in capsys.readouterr().err
    assert eval_cli.main([str(path), "--entropy-code", str(path), "--force"]) == 2
    assert "never overwrites its input" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# TensorBoard


def test_tensorboard_logger_writes_what_the_csvs_hold(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    c = cfg("dataset=synthetic", "model.width=4", "trainer.max_steps=6", "trainer.eval_every=3",
            "trainer.batch_size=32", "trainer.progress=false", "logger=tensorboard")
    summary = scn_experiment.run(build_experiment(c), tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/size_loss", "train/gamma", "eval/test_accuracy",
            "eval/bits_per_weight", "eval/weights_left_pct"} <= tags
    assert any(t.startswith("channels/") for t in tags)
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    acc = events.Scalars("eval/test_accuracy")
    assert [e.step for e in acc] == [int(r["step"]) for r in rows]
    assert acc[-1].value == pytest.approx(summary["test_accuracy"])
    assert len(events.Scalars("train/loss")) == 6
    assert "config" in events.Tags()["tensors"] or events.Tags().get("tensors")


def test_logger_option_leaves_the_config_hash_alone():
    plain = build_experiment(cfg("dataset=synthetic"))
    logged = build_experiment(cfg("dataset=synthetic", "logger=tensorboard"))
    assert scn_experiment.config_hash(plain.config) == scn_experiment.config_hash(logged.config)
