"""The fuzzer's mutators: real .scn files to start from, and the ways to damage them.

Used by tests/test_fuzz.py (a few hundred hypothesis cases) and by scripts/fuzz_format.py
(the committed 20,000-case run). Most mutations are re-signed with a valid checksum, so that
what is tested is the decoder's own checks, not only the SHA-256.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import re
from collections.abc import Callable

import numpy as np
import torch

from scn import container
from scn import format as fmt
from scn.methods import Scheme, quantize_
from scn.models import build
from scn.quant import sc_layers

# ---------------------------------------------------------------------------------------------
# Real files to start from


def _with_random_bits(model: torch.nn.Module, gen: torch.Generator, high: int) -> torch.nn.Module:
    """Per-channel bit depths drawn from 0..high (0: dead), BatchNorms randomized."""
    for _, layer in sc_layers(model):
        if layer.quantized:
            layer.b.data = torch.randint(0, high + 1, layer.b.shape, generator=gen).float()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.bias.data.normal_(0, 1, generator=gen)
            m.running_mean.normal_(0, 1, generator=gen)
    return model


def base_files() -> dict[str, bytes]:
    """Small real .scn files covering the format's features."""
    gen = torch.Generator().manual_seed(0)
    info = {"name": "synthetic", "classes": list("abcd"), "input_shape": [1, 28, 28]}
    files = {}
    for name, kind, width, high in (("mixed", "self_compress", 4, 8), ("deep", "self_compress", 8, 3),
                                    ("fixed", "fixed", 4, 0), ("float", "none", 2, 0)):
        model = quantize_(build("SmallCNN", in_channels=1, num_classes=4, width=width),
                          Scheme(kind=kind, init_bits=4))
        if high:
            _with_random_bits(model, gen, high)
        files[name] = fmt.to_bytes(model, info)
    masked = quantize_(build("SmallCNN", in_channels=1, num_classes=4, width=4), Scheme(init_bits=3))
    masked[3].in_alive[1] = False  # a masked input: the live_inputs tensor
    files["masked"] = fmt.to_bytes(masked, info)
    resnet = quantize_(build("ResNet", in_channels=1, num_classes=4, width=4, blocks=[1, 1],
                             image_size=28), Scheme(init_bits=4))
    files["resnet"] = fmt.to_bytes(_with_random_bits(resnet, gen, 5), info)
    return files


# ---------------------------------------------------------------------------------------------
# Mutators: (rng, raw file) -> damaged file


ABSURD = [-1, 0, 1, 17, 255, 2**31, 2**32 + 1, 2**40, 2**63 - 1, -(2**63), 10**30, 1e308, -1e308,
          0.5, "x", "", None, True, False, [], {}, [2**40, 2**40], [-3, 4], [1] * 64,
          {"name": "SmallCNN"}, "SmallCNN", [[1]], "../../etc/passwd"]
DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.int64, np.float16, np.float32, np.float64,
          np.bool_]


def resign(raw: bytes) -> bytes:
    """`raw` with a correct checksum (when its header still holds one), as scn.save writes it."""
    if len(raw) < 8:
        return raw
    n = int.from_bytes(raw[:8], "little")
    found = list(container._CHECKSUM_RE.finditer(raw, 8, min(8 + n, len(raw))))
    if len(found) != 1:
        return raw
    start, stop = found[0].span(1)
    blank = raw[:start] + b"0" * 64 + raw[stop:]
    return raw[:start] + hashlib.sha256(blank).hexdigest().encode() + raw[stop:]


def _split(raw: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(st_header: dict | str, data: bytes) -> bytes:
    text = st_header if isinstance(st_header, str) else json.dumps(st_header)
    blob = text.encode()
    blob += b" " * (-len(blob) % 8)
    return resign(len(blob).to_bytes(8, "little") + blob + data)


def random_bytes(rng: random.Random, raw: bytes) -> bytes:
    junk = rng.randbytes(rng.choice([0, 1, 7, 8, 9, 64, 1000, 5000]))
    if rng.random() < 0.5 and len(junk) > 8:  # a plausible length prefix, then junk
        junk = rng.randrange(len(junk)).to_bytes(8, "little") + b"{" + junk[9:]
    return junk


def truncate(rng: random.Random, raw: bytes) -> bytes:
    return raw[:rng.randrange(len(raw))]


def bit_flips(rng: random.Random, raw: bytes) -> bytes:
    out = bytearray(raw)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def splice(rng: random.Random, raw: bytes) -> bytes:
    a = rng.randrange(len(raw))
    b = min(len(raw), a + rng.randint(1, 256))
    choice = rng.randrange(3)
    if choice == 0:
        return raw[:a] + raw[b:]  # a chunk deleted
    if choice == 1:
        return raw[:a] + rng.randbytes(b - a) + raw[a:]  # random bytes inserted
    return raw[:b] + raw[a:b] + raw[b:]  # a chunk repeated


def _paths(tree, prefix=()):
    """Every path into a JSON tree (dict keys and list indices)."""
    yield prefix
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        yield from _paths(value, (*prefix, key))


def _mutate_tree(rng: random.Random, tree: dict) -> None:
    """Set, delete or add one field anywhere in `tree` (in place)."""
    path = rng.choice([p for p in _paths(tree) if p])
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    action = rng.randrange(4)
    if action == 0 and isinstance(parent, dict):
        del parent[last]
    elif action == 1 and isinstance(parent, dict):
        parent[rng.choice(["extra", "name", "shape", "kwargs", "bits"])] = rng.choice(ABSURD)
    elif action == 2 and isinstance(parent[last], (int, float)) and not isinstance(parent[last], bool):
        parent[last] = rng.choice([-1, 0, 17, 2**31, 2**62, parent[last] * 1000, -parent[last]])
    else:
        parent[last] = copy.deepcopy(rng.choice(ABSURD))


def header_field(rng: random.Random, raw: bytes) -> bytes:
    """One field of the scn header (model, scheme, reference, dataset, layer and float tables)
    set to an absurd value, deleted or added; re-signed."""
    header, packed = fmt.parse(raw)
    tree = {k: v for k, v in header.items() if k not in ("layers", "floats")}
    tree["layers"], tree["floats"] = packed.layers, packed.floats
    _mutate_tree(rng, tree)
    layers, floats = tree.pop("layers", []), tree.pop("floats", [])
    meta = {container.METADATA_KEY: json.dumps({**tree, "layers": layers, "floats": floats}),
            container.CHECKSUM_KEY: "0" * 64}
    st_header, data = _split(raw)
    st_header["__metadata__"] = meta
    return _join(st_header, data)


def tensor_values(rng: random.Random, raw: bytes) -> bytes:
    """One stored tensor with extreme values, another length, dtype or shape, removed, or an
    unknown tensor added; re-signed."""
    header, packed = fmt.parse(raw)
    tensors = dict(packed.tensors)
    name = rng.choice(sorted(tensors))
    arr = tensors[name]
    action = rng.randrange(7)
    if action == 0 and arr.size:
        arr = arr.copy()
        idx = rng.randrange(arr.size)
        arr[idx] = rng.choice({"codes": [0, 255], "bits": [17, 64, 255], "exponents": [-128, 127],
                               "floats": [np.nan, np.inf, -np.inf, 3e38],
                               "live_inputs": [0, 255]}.get(name, [0]))
    elif action == 1:
        arr = arr[:rng.randrange(arr.size + 1)].copy()
    elif action == 2:
        arr = np.concatenate([arr, np.zeros(rng.randint(1, 100), arr.dtype)])
    elif action == 3:
        arr = arr.astype(rng.choice(DTYPES))
    elif action == 4 and arr.size >= 2:
        arr = arr[:arr.size // 2 * 2].reshape(2, -1).copy()
    elif action == 5:
        del tensors[name]
        arr = None
    else:
        tensors[rng.choice(["extra", "weights", "codes2"])] = np.zeros(rng.randint(0, 9), np.uint8)
    if arr is not None:
        tensors[name] = np.ascontiguousarray(arr)
    rest = {k: v for k, v in header.items() if k not in ("layers", "floats")}
    return fmt.serialize(fmt.Packed(tensors, packed.layers, packed.floats), rest)


def safetensors_table(rng: random.Random, raw: bytes) -> bytes:
    """The safetensors table damaged: an entry's dtype, shape or offsets; re-signed."""
    st_header, data = _split(raw)
    name = rng.choice([k for k in st_header if k != "__metadata__"])
    entry = st_header[name]
    action = rng.randrange(5)
    if action == 0:
        entry["dtype"] = rng.choice(["F64", "I64", "BOOL", "F16", "U8", "I8", "XX", 3, None])
    elif action == 1:
        entry["shape"] = rng.choice([[2**40], [-1], [0], [2**31, 2**31], "x", [1, 2, 3, 4, 5, 6], None])
    elif action == 2:
        a, b = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[b, a], [a, 2**62], [-1, b], [a, b + 1], [0, len(data)],
                                            [a], "x", None])
    elif action == 3:
        st_header[name] = rng.choice(ABSURD)
    else:
        st_header[rng.choice(["extra", "codes"])] = {"dtype": "U8", "shape": [4],
                                                     "data_offsets": [0, 4]}
    return _join(st_header, data)


def raw_resigned(rng: random.Random, raw: bytes) -> bytes:
    """A few bytes of the JSON headers changed (digits above all), then re-signed."""
    n = int.from_bytes(raw[:8], "little")
    out = bytearray(raw)
    digits = [i for i in range(8, 8 + n) if chr(out[i]).isdigit()]
    for _ in range(rng.randint(1, 4)):
        if digits and rng.random() < 0.7:
            out[rng.choice(digits)] = ord(rng.choice("0123456789"))
        else:
            out[rng.randrange(8, 8 + n)] = rng.randrange(32, 127)
    return resign(bytes(out))


_NUMBER = re.compile(r"(?<![\w.])-?\d+(\.\d+)?([eE][-+]?\d+)?")
SPECIAL_NUMBERS = ["1e400", "-1e400", "Infinity", "-Infinity", "NaN", "0", "-1", "1e308"]


def special_number(rng: random.Random, raw: bytes) -> bytes:
    """One number of the scn header written as JSON text Python reads as a non-finite float
    (1e400, Infinity, NaN) or as zero or a negative total; re-signed."""
    st_header, data = _split(raw)
    text = st_header["__metadata__"][container.METADATA_KEY]
    found = list(_NUMBER.finditer(text))
    if found:
        m = rng.choice(found)
        text = text[:m.start()] + rng.choice(SPECIAL_NUMBERS) + text[m.end():]
    st_header["__metadata__"][container.METADATA_KEY] = text
    return _join(st_header, data)


def large_declared(rng: random.Random, raw: bytes) -> bytes:
    """A file padded with zero bytes whose header declares a huge layer (one of 2^20 to 2^30
    weights, mostly at 0 bits), or lists its layers thousands of times; re-signed."""
    header, packed = fmt.parse(raw)
    rest = {k: v for k, v in header.items() if k not in ("layers", "floats")}
    layers, tensors = [dict(entry) for entry in packed.layers], dict(packed.tensors)
    if rng.random() < 0.5:
        entry = rng.choice(layers)
        entry["shape"] = [1 << rng.randint(20, 30)] + [1] * (len(entry["shape"]) - 1)
        entry["live_inputs"] = 1
        tensors["codes"] = np.concatenate([tensors["codes"], np.zeros(rng.choice([0, 4096, 262_144]),
                                                                       np.uint8)])
    else:
        layers = layers * rng.choice([100, 2_500, 5_000])
    return fmt.serialize(fmt.Packed(tensors, layers, packed.floats), rest)


def deep_nesting(rng: random.Random, raw: bytes) -> bytes:
    """A header with a field nested thousands of levels deep (a recursion bomb); re-signed."""
    st_header, data = _split(raw)
    depth = rng.choice([100, 5000, 100_000])
    scn_text = st_header["__metadata__"][container.METADATA_KEY]
    bomb = "[" * depth + "]" * depth
    if rng.random() < 0.5:  # inside the scn header
        st_header["__metadata__"][container.METADATA_KEY] = '{"bomb":' + bomb + "," + scn_text[1:]
        return _join(st_header, data)
    text = json.dumps(st_header)  # inside the safetensors table
    return _join('{"bomb":' + bomb + "," + text[1:], data)


MUTATORS: dict[str, Callable[[random.Random, bytes], bytes]] = {
    "random_bytes": random_bytes, "truncate": truncate, "bit_flips": bit_flips,
    "splice": splice, "header_field": header_field, "tensor_values": tensor_values,
    "safetensors_table": safetensors_table, "raw_resigned": raw_resigned,
    "deep_nesting": deep_nesting, "special_number": special_number,
    "large_declared": large_declared,
}
WEIGHTS = {"random_bytes": 1, "truncate": 1, "bit_flips": 1, "splice": 1, "header_field": 4,
           "tensor_values": 3, "safetensors_table": 2, "raw_resigned": 2, "deep_nesting": 0.3,
           "special_number": 2, "large_declared": 0.5}
