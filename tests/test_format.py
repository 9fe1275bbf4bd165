"""The packed .scn format: bit-exact round trips, sizes, damaged files, the spec, scn-eval."""

import copy
import hashlib
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from safetensors.numpy import load as st_load
from safetensors.torch import load_file, save_file
from torch import nn

from scn import checkpoint, eval_cli, size, surgery
from scn import format as fmt
from scn.data import synthetic
from scn.errors import FormatError
from scn.evaluation import evaluate as evaluate_model
from scn.methods import Scheme, quantize_
from scn.models import SmallCNN, build
from scn.quant import SCLayer, sc_layers
from scn.schedule import Constant
from scn.train import TrainConfig, train

FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def dataset_info(data, name=None):
    return {"name": name or data.name, "classes": data.classes, "input_shape": list(data.input_shape),
            "mean": data.mean.tolist(), "std": data.std.tolist()}


def randomize_norms(model, gen):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
            m.bias.data.normal_(0, 1, generator=gen)
            m.running_mean.normal_(0, 1, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)


def set_random_bits(model, gen, low=0, high=8):
    """Integer bit depths drawn per channel in [low, high]: mixed depths, some channels dead."""
    for _, layer in sc_layers(model):
        if layer.quantized:
            layer.b.data = torch.randint(low, high + 1, layer.b.shape, generator=gen).float()


def weights_equal(a: nn.Module, b: nn.Module) -> None:
    la, lb = sc_layers(a), sc_layers(b)
    assert [n for n, _ in la] == [n for n, _ in lb]
    for (name, x), (_, y) in zip(la, lb, strict=True):
        assert torch.equal(x.effective_weight(), y.effective_weight()), name
        assert torch.equal(x.int_bits(), y.int_bits()), name
        assert torch.equal(x.in_alive, y.in_alive), name
    sa = {k: v for k, v in a.state_dict().items() if not k.endswith(("num_batches_tracked", ".b", ".e"))}
    sb = b.state_dict()
    for key, value in sa.items():
        if key.endswith(".weight") and key.rpartition(".")[0] in dict(la):
            continue  # compared as effective weights above
        assert torch.equal(value, sb[key]), key


# ---------------------------------------------------------------------------------------------
# Bit packing


@pytest.mark.parametrize("bits", range(17))
def test_pack_unpack_every_bit_depth(bits):
    gen = np.random.default_rng(bits)
    o, m = 5, 13  # odd sizes: streams end mid-byte
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if bits else (0, 0)
    codes = gen.integers(low, high + 1, size=(o, m))
    codes[0, :2] = [low, high]  # the extremes of the two's-complement range
    depth = np.full(o, bits)
    stream = fmt.pack_codes(codes, depth)
    assert stream.dtype == np.uint8 and len(stream) == math.ceil(o * m * bits / 8)
    assert np.array_equal(fmt.unpack_codes(stream, depth, m), codes)


def test_mixed_depths_and_the_worked_example_of_the_spec():
    codes = np.array([[1, -2, 3], [0, 0, 0], [-1, 0, 1]])
    bits = np.array([3, 0, 2])
    stream = fmt.pack_codes(codes, bits)
    assert stream.tobytes() == bytes([0xF1, 0x26])  # docs/format.md, "Worked example"
    assert np.array_equal(fmt.unpack_codes(stream, bits, 3), codes)
    gen = np.random.default_rng(0)
    bits = gen.integers(0, 17, size=40)
    codes = np.stack([gen.integers(-(1 << max(b - 1, 0)), max((1 << max(b - 1, 0)) - 1, 0) + 1, 9)
                      if b else np.zeros(9, int) for b in bits])
    stream = fmt.pack_codes(codes, bits)
    assert len(stream) == math.ceil(9 * bits.sum() / 8)
    assert np.array_equal(fmt.unpack_codes(stream, bits, 9), codes)


def test_a_stream_of_the_wrong_length_is_a_format_error():
    with pytest.raises(FormatError, match="corrupt"):
        fmt.unpack_codes(np.zeros(4, np.uint8), np.array([3, 2]), 4)  # 20 bits: 3 bytes


# ---------------------------------------------------------------------------------------------
# Layers round trip bit for bit


def odd_layers(round_bits=True):
    """Layers of every kind the format meets: odd channel counts, 1x1 / 3x3 / 5x3 kernels, a
    Linear, a float layer, every bit depth 0..16, exponents of both signs, masked inputs, an
    all-dead layer and a folded input offset."""
    gen = torch.Generator().manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 17, (5, 3)), nn.Conv2d(5, 7, 1, bias=False), nn.Conv2d(9, 5, 3),
                        nn.Linear(13, 11), nn.Conv2d(4, 3, 3), nn.Linear(7, 5))
    net = quantize_(net, Scheme(init_bits=8, round_bits=round_bits, quantize_last=False))
    layers = [layer for _, layer in sc_layers(net)]
    for i, layer in enumerate(layers[:-1]):
        o = layer.weight.shape[0]
        bits = torch.arange(o) % 17 if i == 0 else torch.randint(0, 17, (o,), generator=gen)
        if i == 4:
            bits = torch.zeros(o, dtype=torch.long)  # all dead
        b = bits.float()
        if not round_bits:  # real bit depths: the file stores ceil(b)
            b = (b - torch.rand(o, generator=gen) * 0.9).where(bits > 0, torch.full_like(b, -0.3))
        layer.b.data = b
        layer.e.data = torch.randint(-12, 7, (o,), generator=gen).float() + 0.3 * torch.rand(o, generator=gen)
        scale = torch.exp2(layer.e.data.round() + bits.clamp(min=1) - 1)
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        layer.weight.data = torch.randn(layer.weight.shape, generator=gen) * scale.view(shape)  # some clip
    for i in (1, 3, 5):  # masked inputs, the float layer included
        alive = torch.rand(layers[i].weight.shape[1], generator=gen) < 0.6
        alive[0] = False
        layers[i].in_alive = alive
    layers[2].input_offset = torch.randn(5, 1, 3, 3, generator=gen)
    layers[3].input_offset = torch.randn(11, generator=gen)
    return net


def zeroed(model):
    fresh = copy.deepcopy(model)
    for t in fresh.state_dict(keep_vars=True).values():
        t.data.zero_()
    return fresh


@pytest.mark.parametrize("round_bits", [True, False])
def test_layers_round_trip_bit_for_bit(round_bits):
    net = odd_layers(round_bits)
    packed = fmt.encode(net)
    got = zeroed(net)
    got.load_state_dict(fmt.decode(packed), strict=False)
    weights_equal(net, got)
    for (name, a), (_, b) in zip(sc_layers(net), sc_layers(got), strict=True):
        if a.quantized:  # the integer codes themselves
            scale = torch.exp2(a.int_exponents().float()).view((-1,) + (1,) * (a.weight.dim() - 1))
            assert torch.equal(a.effective_weight() / scale, b.effective_weight() / scale), name
            assert torch.equal(a.int_exponents()[a.live_out()], b.int_exponents()[a.live_out()]), name
    ideal = sum(int(size.weight_bits(layer)) for _, layer in sc_layers(net) if layer.quantized)
    assert packed.tensors["codes"].size <= ideal / 8 + len(sc_layers(net))
    assert "live_inputs" in packed.tensors


def test_exponent_beyond_range_is_refused():
    net = quantize_(nn.Sequential(nn.Linear(3, 2)), Scheme())
    net[0].e.data[:] = -120
    with pytest.raises(FormatError, match="exponent"):
        fmt.encode(net)


# ---------------------------------------------------------------------------------------------
# Models through the file


@pytest.fixture(scope="module")
def data():
    return synthetic()


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A SmallCNN trained a few steps with surgery, saved; (model, path)."""
    torch.manual_seed(0)
    model = quantize_(build("SmallCNN", in_channels=1, num_classes=4, width=8), Scheme(init_bits=4))
    cfg = TrainConfig(max_epochs=1, max_steps=12, batch_size=64, lr_quant=0.5, prune_every=4,
                      progress=False, device="cpu")
    train(model, data, cfg, Constant(gamma=2.0))  # channels die, surgery folds constants
    path = tmp_path_factory.mktemp("scn") / "model.scn"
    nbytes = fmt.save(model, path, dataset_info(data))
    assert nbytes == path.stat().st_size
    return model.eval(), path


def test_trained_model_round_trips_exactly(trained, data):
    model, path = trained
    loaded, header = fmt.load(path)
    assert not loaded.training
    assert header["dataset"]["classes"] == data.classes and header["dataset"]["input_shape"] == [1, 28, 28]
    weights_equal(model, loaded)  # the run ended physically pruned: nothing else to remove
    loaded = loaded.to(memory_format=torch.channels_last)  # the layout training left the model in
    acc_a, pred_a = evaluate_model(model, data, channels_last=True)
    acc_b, pred_b = evaluate_model(loaded, data, channels_last=True)
    assert torch.equal(pred_a, pred_b) and acc_a == acc_b
    x = data.normalize(data.test_x).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert size.report(loaded).total_bits == size.report(model).total_bits


def dead_small_cnn():
    gen = torch.Generator().manual_seed(5)
    model = quantize_(SmallCNN(num_classes=5, width=6), Scheme(init_bits=6))
    model.scn_spec = {"name": "SmallCNN", "kwargs": {"num_classes": 5, "width": 6}}
    randomize_norms(model, gen)
    set_random_bits(model, gen, 0, 6)
    model[7].b.data[:] = 0.2  # a whole conv dead: surgery keeps one channel, at 0 bits
    model[15].b.data[:] = -1.0  # the classifier dead: protected outputs stay, at 0 bits
    return model, torch.randn(6, 1, 28, 28, generator=gen)


def dead_resnet():
    gen = torch.Generator().manual_seed(6)
    model = build("ResNet", in_channels=3, num_classes=3, width=4, blocks=[1, 1], image_size=12)
    quantize_(model, Scheme(init_bits=5))
    randomize_norms(model, gen)
    set_random_bits(model, gen, 0, 5)
    return model, torch.randn(6, 3, 12, 12, generator=gen)


@pytest.mark.parametrize("build_model", [dead_small_cnn, dead_resnet])
@pytest.mark.parametrize("masked_first", [False, True])
def test_dead_channels_and_masked_inputs_are_not_stored(build_model, masked_first, tmp_path):
    model, x = build_model()
    if masked_first:  # a model trained in "masked" mode: dead inputs multiplied by zero
        surgery.prune(model, surgery.trace(model, x), physical=False)
        assert any(not bool(layer.in_alive.all()) for _, layer in sc_layers(model))
    model.eval()
    fmt.save(model, tmp_path / "m.scn", {"input_shape": list(x.shape[1:])})
    loaded, header = fmt.load(tmp_path / "m.scn")
    reference = surgery.shrunk_copy(model, tuple(x.shape[1:])).eval()
    weights_equal(reference, loaded)  # the pruned copy, bit for bit
    with torch.no_grad():
        before, after = model(x), loaded(x)
        assert torch.equal(reference(x), after)
    assert torch.equal(before.argmax(1), after.argmax(1))
    assert float((before - after).abs().max()) <= 1e-5 * (1 + float(before.abs().max()))
    removed = 0
    for name, layer in sc_layers(loaded):
        assert bool(layer.in_alive.all()), name  # dead inputs are gone from the shapes
        original = dict(sc_layers(model))[name]
        removed += original.weight.shape[0] - layer.weight.shape[0]
    assert removed > 0
    assert "live_inputs" not in st_load((tmp_path / "m.scn").read_bytes())
    if build_model is dead_small_cnn:
        assert loaded[7].weight.shape[0] == 1 and int(loaded[7].int_bits()[0]) == 0
        assert loaded[15].weight.shape[0] == 5 and not bool(loaded[15].live_out().any())
    stats = fmt.file_stats(tmp_path / "m.scn")
    entries = [e for e in header["layers"] if e["quantized"]]
    need = sum(math.ceil(int(size.weight_bits(layer)) / 8)
               for _, layer in sc_layers(loaded) if layer.quantized)
    assert stats["payload_bytes"] == need and len(entries) == len(sc_layers(loaded))


def test_file_size_bounds_on_a_mixed_depth_small_cnn(tmp_path):
    gen = torch.Generator().manual_seed(7)
    model = quantize_(build("SmallCNN", in_channels=1, num_classes=10, width=16), Scheme(init_bits=8))
    randomize_norms(model, gen)
    set_random_bits(model, gen, 0, 8)
    info = {"name": "fashion_mnist", "classes": FMNIST_CLASSES, "input_shape": [1, 28, 28],
            "mean": [0.2860405743122101], "std": [0.3530242443084717]}
    nbytes = fmt.save(model, tmp_path / "m.scn", info)
    loaded, _ = fmt.load(tmp_path / "m.scn")
    rep = size.report(loaded)
    stats = fmt.file_stats(tmp_path / "m.scn")
    layers = len(sc_layers(loaded))
    assert stats["file_bytes"] == nbytes
    assert stats["payload_bytes"] <= 1.01 * rep.payload_ideal_bytes + 8 * layers
    assert stats["float_bytes"] == rep.float_bits / 8 and stats["meta_bytes"] == rep.meta_bits / 8
    assert nbytes <= stats["payload_bytes"] + rep.float_bits / 8 + 4096
    assert nbytes <= rep.ideal_bytes + layers + 4096
    assert stats["overhead_bytes"] < 3072


def test_float_and_fixed_models_round_trip(tmp_path, data):
    for kind in ("none", "fixed"):
        model = quantize_(build("SmallCNN", in_channels=1, num_classes=4, width=4),
                          Scheme(kind=kind, init_bits=5))
        model.eval()
        fmt.save(model, tmp_path / f"{kind}.scn", dataset_info(data))
        loaded, header = fmt.load(tmp_path / f"{kind}.scn")
        assert header["scheme"]["kind"] == kind
        weights_equal(model, loaded)
        x = data.normalize(data.test_x[:50])
        with torch.no_grad():
            assert torch.equal(model(x), loaded(x))


def test_package_exports_save_and_load():
    import scn

    assert scn.save is fmt.save and scn.load is fmt.load
    assert scn.quantize_ is quantize_ and scn.Scheme is Scheme and scn.size_loss is size.size_loss
    assert scn.size_report is size.report


# ---------------------------------------------------------------------------------------------
# Damaged, foreign and future files: one FormatError with a clear message, never a crash


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    gen = torch.Generator().manual_seed(8)
    model = quantize_(build("SmallCNN", in_channels=1, num_classes=4, width=4), Scheme(init_bits=4))
    set_random_bits(model, gen, 1, 4)
    path = tmp_path_factory.mktemp("small") / "m.scn"
    fmt.save(model, path, {"name": "synthetic", "classes": list("abcd"), "input_shape": [1, 28, 28]})
    return path


def header_span(raw):
    return 8, 8 + int.from_bytes(raw[:8], "little")


def test_truncated_files_are_clear_errors(small_file, tmp_path):
    raw = small_file.read_bytes()
    start, end = header_span(raw)
    for cut in (0, 5, 8, 9, 40, end - 3, end, end + 5, len(raw) // 2 + 3, len(raw) - 1):
        bad = tmp_path / f"cut{cut}.scn"
        bad.write_bytes(raw[:cut])
        with pytest.raises(FormatError, match="truncated|not a .scn model file|only") as info:
            fmt.load(bad)
        assert str(bad) in str(info.value)


def test_every_flipped_header_byte_is_detected(small_file):
    raw = small_file.read_bytes()
    start, end = header_span(raw)
    for pos in range(0, end):
        for mask in (0x01, 0x80):
            bad = bytearray(raw)
            bad[pos] ^= mask
            with pytest.raises(FormatError):
                fmt.parse(bytes(bad))


def test_flipped_data_bytes_are_detected(small_file, tmp_path):
    raw = small_file.read_bytes()
    _, end = header_span(raw)
    for pos in list(range(end, len(raw), 97)) + [len(raw) - 1]:
        bad = bytearray(raw)
        bad[pos] ^= 0x10
        with pytest.raises(FormatError, match="checksum"):
            fmt.parse(bytes(bad))
    bad = bytearray(raw)
    bad[end - 40] ^= 0x01  # through a file on disk, with its name in the message
    (tmp_path / "flip.scn").write_bytes(bytes(bad))
    with pytest.raises(FormatError, match="flip.scn"):
        fmt.load(tmp_path / "flip.scn")


def test_wrong_version_is_refused(tmp_path, monkeypatch):
    model = quantize_(build("SmallCNN", in_channels=1, num_classes=4, width=4), Scheme())
    monkeypatch.setattr(fmt, "VERSION", 3)
    fmt.save(model, tmp_path / "v3.scn")
    monkeypatch.setattr(fmt, "VERSION", 1)
    with pytest.raises(FormatError, match="version 3 of the .scn format; this scn reads version 1 or 2"):
        fmt.load(tmp_path / "v3.scn")


def test_foreign_files_are_refused(tmp_path, trained):
    rng = np.random.default_rng(0)
    cases = {
        "random.scn": rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "small_len.scn": (100).to_bytes(8, "little") + bytes(rng.integers(0, 256, 500).astype(np.uint8)),
        "empty.scn": b"",
        "text.scn": b"hello, this is not a model at all\n" * 10,
    }
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(FormatError, match="not a .scn model file"):
            fmt.load(tmp_path / name)
    save_file({"w": torch.ones(3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(FormatError, match="safetensors file without scn's"):
        fmt.load(tmp_path / "plain.safetensors")
    checkpoint.save_checkpoint(trained[0], tmp_path / "model.safetensors")
    with pytest.raises(FormatError, match="model checkpoint"):
        fmt.load(tmp_path / "model.safetensors")
    with pytest.raises(FormatError, match="cannot read"):
        fmt.load(tmp_path / "missing.scn")


def test_valid_checksum_but_inconsistent_tables_is_a_format_error(small_file):
    raw = small_file.read_bytes()
    header, packed = fmt.parse(raw)
    packed.layers[1]["live_inputs"] += 1  # a writer bug, not a damaged file: checksum is valid
    bad = fmt.serialize(packed, {k: v for k, v in header.items() if k not in ("layers", "floats")})
    with pytest.raises(FormatError):
        fmt.decode(fmt.parse(bad)[1])


# ---------------------------------------------------------------------------------------------
# An independent decoder, written from docs/format.md alone (numpy + safetensors.numpy)


def spec_decode(raw: bytes):
    """Per quantized layer: (codes (O, M) as Python ints, exponents, live input mask)."""
    n = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8:8 + n])["__metadata__"]
    header = json.loads(meta["scn"])
    assert header["format"] == "scn" and header["version"] == 1
    digest = meta["scn_sha256"]
    blank = raw.replace(f'"scn_sha256":"{digest}"'.encode(), f'"scn_sha256":"{"0" * 64}"'.encode())
    assert hashlib.sha256(blank).hexdigest() == digest
    t = st_load(raw)
    cur_bits = cur_codes = cur_mask = 0
    out = {}
    for layer in header["layers"]:
        o, i = layer["shape"][:2]
        k = math.prod(layer["shape"][2:])
        live = layer["live_inputs"]
        mask = [True] * i
        if live < i:
            nb = (i + 7) // 8
            byts = t["live_inputs"][cur_mask:cur_mask + nb]
            cur_mask += nb
            mask = [bool((byts[j // 8] >> (j % 8)) & 1) for j in range(i)]
            assert sum(mask) == live
        if not layer["quantized"]:
            continue
        depths = [int(b) for b in t["bits"][cur_bits:cur_bits + o]]
        exps = [int(e) for e in t["exponents"][cur_bits:cur_bits + o]]
        cur_bits += o
        m = live * k
        nbytes = (m * sum(depths) + 7) // 8
        stream = int.from_bytes(t["codes"][cur_codes:cur_codes + nbytes].tobytes(), "little")
        cur_codes += nbytes
        codes, bit = [], 0
        for depth in depths:
            row = []
            for _ in range(m):
                u = (stream >> bit) & ((1 << depth) - 1) if depth else 0
                row.append(u - (1 << depth) if depth and u >= 1 << (depth - 1) else u)
                bit += depth
            codes.append(row)
        assert stream >> bit == 0  # padding bits are zero
        out[layer["name"]] = (np.array(codes, dtype=np.int64).reshape(o, m), np.array(exps), np.array(mask))
    assert cur_bits == len(t["bits"]) and cur_codes == len(t["codes"])
    return out


def scn_codes(layer: SCLayer) -> np.ndarray:
    scale = torch.exp2(layer.int_exponents().float()).view((-1,) + (1,) * (layer.weight.dim() - 1))
    return (layer.effective_weight() / scale)[:, layer.in_alive].flatten(1).to(torch.int64).numpy()


def test_spec_decoder_matches_on_a_saved_model(small_file, trained):
    for path in (small_file, trained[1]):
        model, _ = fmt.load(path)
        independent = spec_decode(path.read_bytes())
        quantized = [(n, layer) for n, layer in sc_layers(model) if layer.quantized]
        assert sorted(independent) == sorted(n for n, _ in quantized)
        for name, layer in quantized:
            codes, exps, _ = independent[name]
            assert np.array_equal(codes, scn_codes(layer)), name
            live = layer.live_out().numpy()
            assert np.array_equal(exps[live], layer.int_exponents().numpy()[live]), name


def test_spec_decoder_matches_on_odd_layers_with_masks():
    net = odd_layers()
    raw = fmt.serialize(fmt.encode(net), {"format": "scn", "version": 1})
    independent = spec_decode(raw)
    for name, layer in sc_layers(net):
        if layer.quantized:
            codes, _, mask = independent[name]
            assert np.array_equal(mask, layer.in_alive.numpy()), name
            assert np.array_equal(codes, scn_codes(layer)), name


# ---------------------------------------------------------------------------------------------
# scn-eval


def test_scn_eval_json(trained, data, capsys):
    model, path = trained
    assert eval_cli.main([str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    acc, _ = evaluate_model(model, data)
    rep = size.report(model)
    assert out["test_accuracy"] == acc and out["file_bytes"] == path.stat().st_size
    assert out["bits_per_weight"] == pytest.approx(rep.bits_per_weight)
    assert out["ideal_bytes"] == rep.ideal_bytes and out["float32_bytes"] == rep.float32_bytes
    assert out["channels_left"] == {k: v[0] for k, v in rep.channels.items()}
    assert eval_cli.main([str(path)]) == 0
    text = capsys.readouterr().out
    assert "test accuracy" in text and "bits/weight" in text and "channels left" in text


def test_scn_eval_export_never_replaces_its_input_and_asks_before_replacing(tmp_path, data, capsys):
    model = quantize_(build("SmallCNN", in_channels=1, num_classes=4, width=4), Scheme(init_bits=4))
    path = tmp_path / "m.scn"
    fmt.save(model, path, dataset_info(data))
    before = path.read_bytes()
    for target, force in ((path, False), (path, True), (tmp_path / "." / "m.scn", True)):
        assert eval_cli.main([str(path), "--export", str(target)] + ["--force"] * force) == 2
        assert "never overwrites its input" in capsys.readouterr().err
    assert path.read_bytes() == before
    other = tmp_path / "plain.safetensors"
    other.write_bytes(b"keep me")
    assert eval_cli.main([str(path), "--export", str(other)]) == 2
    assert "already exists" in capsys.readouterr().err and other.read_bytes() == b"keep me"
    assert eval_cli.main([str(path), "--export", str(other), "--force"]) == 0
    assert other.read_bytes() != b"keep me"


def test_scn_eval_export_is_a_plain_state_dict(tmp_path, data, capsys):
    gen = torch.Generator().manual_seed(9)
    model = quantize_(build("SmallCNN", in_channels=1, num_classes=4, width=4), Scheme(init_bits=6))
    set_random_bits(model, gen, 1, 6)
    fmt.save(model, tmp_path / "m.scn", dataset_info(data))
    out = tmp_path / "plain.safetensors"
    assert eval_cli.main([str(tmp_path / "m.scn"), "--export", str(out)]) == 0
    assert "exported" in capsys.readouterr().out
    state = load_file(str(out))
    plain = SmallCNN(num_classes=4, width=4).eval()
    assert set(state) == set(plain.state_dict())
    plain.load_state_dict(state)
    x = data.normalize(data.test_x[:64])
    with torch.no_grad():
        assert torch.equal(plain(x), fmt.load(tmp_path / "m.scn")[0](x))


def test_scn_eval_errors_are_one_line_without_traceback(tmp_path, small_file, capsys):
    (tmp_path / "junk.scn").write_bytes(b"\x00" * 100)
    cases = [[str(tmp_path / "junk.scn")], [str(small_file), "--dataset", "imagenet"],
             [str(tmp_path / "missing.scn")]]
    for argv in cases:
        assert eval_cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("scn-eval: error: ") and "Traceback" not in err
    model = quantize_(build("SmallCNN", in_channels=1, num_classes=4, width=4), Scheme())
    fmt.save(model, tmp_path / "nodata.scn")
    assert eval_cli.main([str(tmp_path / "nodata.scn")]) == 2
    assert "--dataset" in capsys.readouterr().err
    assert eval_cli.main([str(tmp_path / "nodata.scn"), "--dataset", "synthetic", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dataset"] == "synthetic"


def test_python_m_scn_eval_cli(trained):
    proc = subprocess.run([sys.executable, "-m", "scn.eval_cli", str(trained[1]), "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r'"test_accuracy": [0-9.]+', proc.stdout)
