"""The packed `.scn` file: a trained model at the size the accounting promises.

`save(model, path)` writes every quantized weight as its integer code packed at its own
channel's bit depth (a 3-bit channel costs 3 bits per weight, a 0-bit channel nothing);
`load(path)` rebuilds the model, bit for bit. docs/format.md is the specification; this module
is one implementation of it.

The container (scn.container: safetensors, a JSON header, a SHA-256 of the whole file) holds
five tensors (docs/format.md): `codes`, `bits`, `exponents`, `floats` and, only when some
layer has dead inputs, `live_inputs`. The header describes the model as `checkpoint.describe`
does and lists the layers and float tensors in storage order.

Channels: before writing, a deep copy of the model goes through physical channel surgery
(`surgery.shrunk_copy`): 0-bit channels leave with their BatchNorm entries and their consumers'
input columns, any constant they still emitted folded into the consumers (`input_offset`).
What surgery must keep at 0 bits is stored with bit depth 0 and no codes; inputs still masked
(a model surgery cannot trace) are not stored, and a bit mask says which. The decoded model
is the pruned copy, bit for bit. Version 2 codes the `codes` stream losslessly (scn.entropy).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from torch import nn

from scn import checkpoint, container, entropy, io, surgery
from scn.errors import FormatError
from scn.packing import pack_codes, unpack_codes
from scn.quant import MAX_BITS, SCLayer, sc_layers
from scn.reference import FREE_SUFFIXES

FORMAT = "scn"
VERSION = 1  # version 2: version 1 with an entropy-coded payload (`coding` in the header)
VERSIONS = (1, 2)
MAX_EXPONENT = 110  # |E| <= 110 keeps every code * 2^E an exact, normal float32
_MAX_ELEMENTS = 1 << 32  # no layer of a real model comes near; a larger one is a damaged header
# Sizes a file's bytes can plausibly describe, checked before anything is allocated: decoded
# tensors (a real file stores >= 1 bit per weight of all but a few channels: 8 per byte, with
# room to spare) and the full model its header names (before surgery removed channels).
_ELEMENTS_PER_BYTE, _MIN_ELEMENTS = 64, 1 << 22
_SCALARS_PER_BYTE, _MIN_SCALARS = 1024, 1 << 24
_MAX_INPUT_ELEMENTS = 1 << 22  # one input image (C*H*W) for the load-time check
_REAL_CHECK_WORK = 1 << 30  # ~0.05 s of multiply-adds on two CPU cores
MAX_LAYERS, MAX_FLOAT_TENSORS = 10_000, 100_000  # far beyond any CNN; a header beyond is refused


# A model's state <-> the five tensors and the two tables of the header.
@dataclass
class Packed:
    """What the file stores, before serialization: tensors and the header's two tables."""

    tensors: dict[str, np.ndarray]
    layers: list[dict] = field(default_factory=list)  # one per Conv2d/Linear, in model order
    floats: list[list] = field(default_factory=list)  # [name, shape] in storage order


def _codes_of(name: str, layer: SCLayer, live: torch.Tensor, bits: torch.Tensor,
              exps: torch.Tensor) -> np.ndarray:
    """The integer codes of a quantized layer's live inputs, checked to fit their bit depths."""
    w = layer.effective_weight().detach().cpu().float()[:, live]
    exps = torch.where(bits > 0, exps, 0)  # a 0-bit channel's weights are 0 whatever its exponent
    codes = (w / torch.exp2(exps.float()).view((-1,) + (1,) * (w.dim() - 1))).flatten(1)
    b = bits.view(-1, 1)
    low = torch.where(b > 0, -(2.0 ** (b - 1).clamp(min=0)), 0.0)
    high = torch.where(b > 0, 2.0 ** (b - 1).clamp(min=0) - 1, 0.0)
    ok = (codes == torch.round(codes)) & (codes >= low) & (codes <= high)
    if not bool(ok.all()):
        raise FormatError(f"layer {name!r} cannot be packed: its quantized weights are not "
                          "integer codes of their bit depths (are some weights NaN or Inf?). "
                          "Check that training finished without diverging.")
    return codes.to(torch.int32).numpy()


def encode(model: nn.Module) -> Packed:
    """Pack `model`'s state as it is (no surgery): see the module docstring for the layout."""
    state = model.state_dict()
    layers, floats, float_arrays = [], [], []
    codes, bits_all, exps_all, masks = [], [], [], []
    handled: set[str] = set()

    def add_float(key: str, tensor: torch.Tensor) -> None:
        arr = tensor.detach().cpu().float().contiguous().numpy()
        floats.append([key, list(arr.shape)])
        float_arrays.append(arr.reshape(-1))

    by_name = dict(sc_layers(model))
    for name, layer in by_name.items():
        prefix = f"{name}." if name else ""
        live = layer.in_alive.detach().cpu().bool()
        shape = list(layer.weight.shape)
        n_live = int(live.sum())
        layers.append({"name": name, "shape": shape, "quantized": layer.quantized,
                       "live_inputs": n_live})
        if n_live < shape[1]:
            masks.append(np.packbits(live.numpy().astype(np.uint8), bitorder="little"))
        if layer.quantized:
            bits = layer.int_bits().cpu()
            exps = layer.int_exponents().cpu()
            if bool(((exps.abs() > MAX_EXPONENT) & (bits > 0)).any()):
                raise FormatError(f"layer {name!r} has an exponent beyond +-{MAX_EXPONENT}; its "
                                  "weights cannot be stored exactly. The model is degenerate.")
            codes.append(pack_codes(_codes_of(name, layer, live, bits, exps), bits.numpy()))
            bits_all.append(bits.numpy().astype(np.uint8))
            exps_all.append(exps.clamp(-128, 127).numpy().astype(np.int8))
            handled.update(prefix + k for k in ("weight", "b", "e"))
        else:
            add_float(prefix + "weight", layer.weight.detach()[:, live])
            handled.add(prefix + "weight")
        if not layer.input_offset.numel():
            handled.add(prefix + "input_offset")  # empty: the rebuilt model's default
    for key, tensor in state.items():
        if key in handled or key.endswith(FREE_SUFFIXES):
            continue
        if not tensor.is_floating_point():
            raise FormatError(f"tensor {key!r} is {tensor.dtype}; the .scn format stores "
                              "quantized weights and float tensors only.")
        add_float(key, tensor)

    def cat(parts, dtype):
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

    tensors = {"codes": cat(codes, np.uint8), "bits": cat(bits_all, np.uint8),
               "exponents": cat(exps_all, np.int8), "floats": cat(float_arrays, np.float32)}
    if masks:
        tensors["live_inputs"] = cat(masks, np.uint8)
    return Packed(tensors, layers, floats)


def _take(arr: np.ndarray, start: int, n: int, what: str) -> np.ndarray:
    if start + n > len(arr):
        raise FormatError(f"the file's {what} tensor is too short for the layers its header "
                          "lists; the file is corrupt.")
    return arr[start:start + n]


def _check_dtypes(tensors: dict[str, np.ndarray]) -> None:
    want = {"codes": np.uint8, "bits": np.uint8, "exponents": np.int8, "floats": np.float32,
            "live_inputs": np.uint8}
    for name, arr in tensors.items():
        if name not in want:
            raise FormatError(f"the file holds a tensor {name!r} that the .scn format does not have.")
        if arr.dtype != want[name] or arr.ndim != 1:
            raise FormatError(f"tensor {name!r} is {arr.dtype} of shape {list(arr.shape)}; the "
                              f".scn format stores it as a flat {np.dtype(want[name])} tensor.")
    for name in ("codes", "bits", "exponents", "floats"):
        if name not in tensors:
            raise FormatError(f"the file lacks the {name!r} tensor; it is not a complete .scn file.")


def decode(packed: Packed) -> dict[str, torch.Tensor]:
    """The state dict a Packed stores (float tensors and full-shape weights, b, e, in_alive).

    Dead inputs come back as zero columns with `in_alive` False; 0-bit channels as zero rows.
    """
    t = packed.tensors
    _check_dtypes(t)
    state: dict[str, torch.Tensor] = {}
    pos = {"codes": 0, "bits": 0, "live_inputs": 0, "floats": 0}
    floats = t["floats"]
    if not bool(np.isfinite(floats).all()):
        raise FormatError("the file stores NaN or infinite float values (a norm's statistics, a "
                          "bias), which no trained scn model holds; the file is corrupt.")
    stored: dict[str, torch.Tensor] = {}
    for key, shape in packed.floats:
        n = math.prod(shape)
        stored[key] = torch.from_numpy(_take(floats, pos["floats"], n, "floats").reshape(shape).copy())
        pos["floats"] += n
    if pos["floats"] != len(floats):
        raise FormatError("the floats tensor is longer than the tensors the header lists; corrupt file.")
    if len(stored) != len(packed.floats):
        raise FormatError("the header lists a float tensor twice; the file is corrupt.")
    for entry in packed.layers:
        name, shape, n_live = entry["name"], [int(s) for s in entry["shape"]], int(entry["live_inputs"])
        prefix = f"{name}." if name else ""
        o, i, kernel = shape[0], shape[1], shape[2:]
        if not 0 <= n_live <= i or o < 0:
            raise FormatError(f"layer {name!r}: the header's shape {shape} and live input count "
                              f"{n_live} are inconsistent; the file is corrupt.")
        live = torch.ones(i, dtype=torch.bool)
        if n_live < i:
            nbytes = -(-i // 8)
            raw = _take(t.get("live_inputs", np.zeros(0, np.uint8)), pos["live_inputs"], nbytes,
                        "live_inputs")
            pos["live_inputs"] += nbytes
            live = torch.from_numpy(np.unpackbits(raw, count=i, bitorder="little").astype(bool))
            if int(live.sum()) != n_live:
                raise FormatError(f"layer {name!r}: its input mask does not match its live input "
                                  "count; the file is corrupt.")
        m = n_live * math.prod(kernel)
        weight = torch.zeros(shape, dtype=torch.float32)
        if entry["quantized"]:
            bits = _take(t["bits"], pos["bits"], o, "bits").astype(np.int64)
            exps = _take(t["exponents"], pos["bits"], o, "exponents").astype(np.int64)
            pos["bits"] += o
            if bits.size and int(bits.max()) > MAX_BITS:
                raise FormatError(f"layer {name!r} has a bit depth of {int(bits.max())}; the .scn "
                                  f"format allows 0..{MAX_BITS}. The file is corrupt.")
            if bool((np.abs(exps[bits > 0]) > MAX_EXPONENT).any()):
                raise FormatError(f"layer {name!r} has an exponent beyond +-{MAX_EXPONENT}, which no "
                                  "scn writes (its weights would not be exact floats). The file is corrupt.")
            nbytes = -(-m * int(bits.sum()) // 8)
            codes = unpack_codes(_take(t["codes"], pos["codes"], nbytes, "codes"), bits, m)
            pos["codes"] += nbytes
            e = torch.from_numpy(exps).float()
            live_w = torch.from_numpy(codes).float() * torch.exp2(e).view(-1, 1)
            weight[:, live] = live_w.view(o, n_live, *kernel)
            state[prefix + "b"] = torch.from_numpy(bits).float()
            state[prefix + "e"] = e
        else:
            part = stored.pop(prefix + "weight", None)
            if part is None or list(part.shape) != [o, n_live, *kernel]:
                raise FormatError(f"float layer {name!r} has no weight of shape "
                                  f"{[o, n_live, *kernel]} in the file; the file is corrupt.")
            weight[:, live] = part
        state[prefix + "weight"] = weight
        state[prefix + "in_alive"] = live
    for name in ("codes", "bits", "live_inputs"):
        have = len(t.get(name, ())) if name != "bits" else len(t["bits"])
        if pos[name] != have or (name == "bits" and len(t["exponents"]) != have):
            raise FormatError(f"the {name} tensor does not match the layers the header lists; "
                              "the file is corrupt.")
    clash = set(stored) & set(state)
    if clash:
        raise FormatError(f"the file stores {sorted(clash)[:3]} twice; the file is corrupt.")
    state.update(stored)
    return state


# ---------------------------------------------------------------------------------------------
# The file: serialization, checks, and the public save / load.


def serialize(packed: Packed, header: dict) -> bytes:
    """The file's bytes: safetensors with the header and the checksum in its metadata."""
    return container.write(st_save, packed.tensors,
                           {**header, "layers": packed.layers, "floats": packed.floats})


def read_header(path: str | Path) -> dict:
    """The JSON header of a .scn file (format and version checked; data not read or verified)."""
    return container.header_of(container.read_head(path), str(path), FORMAT, VERSIONS)[0]


def parse(raw: bytes, name: str = "the data") -> tuple[dict, Packed]:
    """Check a whole file held in memory and split it into its header and Packed contents."""
    header, n, st_header = container.header_of(raw, name, FORMAT, VERSIONS)
    container.verify(raw, name, n, st_header)
    coded = entropy.coded(header, name)
    try:
        tensors = st_load(bytes(raw))
    except Exception as exc:  # safetensors raises several types; the user needs one message
        raise FormatError(f"{name} is corrupt: safetensors cannot read its tensors ({exc}).") from None
    if not coded:
        _check_dtypes(tensors)
    try:
        layers, floats = header["layers"], header["floats"]
        if not (isinstance(layers, list) and isinstance(floats, list)):
            raise TypeError("layers and floats must be lists")
        if len(layers) > MAX_LAYERS or len(floats) > MAX_FLOAT_TENSORS:
            raise ValueError(f"{len(layers)} layers and {len(floats)} float tensors, beyond the "
                             f"format's limits of {MAX_LAYERS:,} and {MAX_FLOAT_TENSORS:,}")
        for entry in layers:
            shape = [int(s) for s in entry["shape"]]
            if not isinstance(entry["name"], str) or not isinstance(entry["quantized"], bool):
                raise TypeError("a layer's name must be a string and quantized a boolean")
            if len(shape) not in (2, 4) or min(shape) < 0 or math.prod(shape) > _MAX_ELEMENTS:
                raise ValueError(f"implausible layer shape {shape}")
            if not 0 <= int(entry["live_inputs"]) <= shape[1]:
                raise ValueError(f"live_inputs {entry['live_inputs']} outside 0..{shape[1]}")
        floats = [[str(k), [int(s) for s in shape]] for k, shape in floats]
        if any(min(shape, default=0) < 0 for _, shape in floats):
            raise ValueError("a negative dimension in the floats table")
        elements = sum(math.prod(int(s) for s in e["shape"]) for e in layers)
        elements += sum(math.prod(shape) for _, shape in floats)
        if elements > max(_MIN_ELEMENTS, _ELEMENTS_PER_BYTE * len(raw)):
            raise ValueError(f"{elements} elements are far more than {len(raw)} bytes can hold")
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"{name}: the header's layer tables are malformed ({exc}); the file "
                          "was not written by scn or is corrupt.") from None
    if coded:
        tensors = entropy.expand(tensors, layers)
        _check_dtypes(tensors)
    return header, Packed(tensors, layers, floats)


def save(model: nn.Module, path: str | Path, dataset: dict | None = None,
         entropy_coded: bool = False, input_shape: tuple[int, ...] | None = None) -> int:
    """Write `model` as a packed .scn file (atomically); returns the file's size in bytes.

    `model`: any model `scn.quantize_` converted (one from `scn.models.build` is named in
    the file, any other loads with a skeleton). `dataset`: an Experiment's `dataset_info()`,
    for scn-eval; `input_shape` (C, H, W) lets surgery cut 0-bit channels where it has none.
    `entropy_coded`: code the payload under its empirical distribution (scn.entropy), decoded to
    the same model bit for bit, readable by scn releases that know version 2; written only
    when that makes the file smaller (else the plain file).
    """
    if input_shape is not None:
        dataset = {**(dataset or {}), "input_shape": [int(s) for s in input_shape]}
    raw = to_bytes(model, dataset, entropy_coded)
    io.write_bytes(path, raw)
    return len(raw)


def to_bytes(model: nn.Module, dataset: dict | None = None, entropy_coded: bool = False) -> bytes:
    """The .scn file of `model`, in memory (what `save` writes)."""
    header = {"format": FORMAT, "version": VERSION, **checkpoint.describe(model, dataset)}
    packed = encode(surgery.shrunk_copy(model, checkpoint.input_shape(header)))
    plain = serialize(packed, header)
    if not entropy_coded:
        return plain
    header.update(version=2, coding={"codes": entropy.CODING})
    packed.tensors = entropy.compress(packed.tensors, packed.layers)
    coded = serialize(packed, header)
    return coded if len(coded) < len(plain) else plain  # the count tables can outweigh the gain


def load(path: str | Path, device: str | torch.device = "cpu",
         model: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model a .scn file holds; returns (model in eval mode, header).

    `model`: a fresh skeleton of the architecture, shrunk to the stored shapes and loaded in
    place (needed for models scn's registry did not build)."""
    name = str(path)
    raw = container.read_bytes(path)
    header, packed = parse(raw, name)
    state = decode(packed)
    try:
        model = checkpoint.rebuild(header, {k: tuple(v.shape) for k, v in state.items()},
                                   max_scalars=max(_MIN_SCALARS, _SCALARS_PER_BYTE * len(raw)),
                                   skeleton=model)
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"{name}: its header does not describe a model scn can build ({exc}).") from None
    except FormatError as exc:
        raise FormatError(f"{name}: {exc}") from None
    for layer_name, layer in sc_layers(model):
        kernel = tuple(getattr(layer, "kernel_size", ()))
        if tuple(layer.weight.shape[2:]) != kernel:
            raise FormatError(f"{name}: layer {layer_name!r} is stored with kernel "
                              f"{list(layer.weight.shape[2:])} but the model has {list(kernel)}; "
                              "the file is corrupt.")
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(("num_batches_tracked", "input_offset"))]
    if missing:
        raise FormatError(f"{name} lacks tensors the model needs ({missing[:4]}); the file is corrupt.")
    try:
        checkpoint.load_tensors(model, state, strict=False)
    except RuntimeError as exc:
        raise FormatError(f"{name}: its tensors do not fit the model its header names ({exc}).") from None
    model.eval()
    _check_forward(model, header, name)
    return model.to(device), header


def _check_forward(model: nn.Module, header: dict, name: str) -> None:
    """One forward pass at the header's input shape, to check the stored shapes fit together. A
    real one when it is cheap (about parameters x pixels multiply-adds); else on the meta
    device, where nothing is computed whatever the size a header declares."""
    try:
        shape = checkpoint.input_shape(header)
        if shape is not None and (len(shape) != 3 or min(shape) <= 0
                                  or math.prod(shape) > _MAX_INPUT_ELEMENTS):
            raise ValueError(f"implausible input shape {list(shape)}")
    except (AttributeError, TypeError, ValueError) as exc:
        raise FormatError(f"{name}: the header's dataset description is malformed ({exc}); the "
                          "file is corrupt.") from None
    if shape is None:
        return
    work = sum(p.numel() for p in model.parameters()) * math.prod(shape[1:])
    try:
        with torch.no_grad():
            if work <= _REAL_CHECK_WORK:
                model(torch.zeros((1, *shape)))
            else:
                copy.deepcopy(model).to("meta")(torch.zeros((1, *shape), device="meta"))
    except (RuntimeError, ValueError) as exc:
        raise FormatError(f"{name}: the stored shapes do not make a working model ({exc}); "
                          "the file is corrupt.") from None


def file_stats(path: str | Path) -> dict:
    """Where a .scn file's bytes go: payload (codes), meta (bits, exponents), floats, the rest."""
    raw, size = container.read_head(path), Path(path).stat().st_size
    n = container.tensor_bytes(container.header_of(raw, str(path), FORMAT, VERSIONS)[2], str(path))
    parts = {"payload_bytes": n.get("codes", 0) + n.get(entropy.WORDS, 0) + n.get(entropy.COUNTS, 0),
             "meta_bytes": n.get("bits", 0) + n.get("exponents", 0),
             "float_bytes": n.get("floats", 0), "mask_bytes": n.get("live_inputs", 0)}
    return {"file_bytes": size, **parts, "overhead_bytes": size - sum(parts.values())}


__all__ = ["FORMAT", "VERSION", "Packed", "decode", "encode", "file_stats", "load", "pack_codes",
           "parse", "read_header", "save", "serialize", "unpack_codes"]
