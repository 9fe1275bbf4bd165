"""An entropy-coded payload: the packed codes, losslessly, in fewer bytes than their bit count.

The codes of a layer are grouped by bit depth (all its B-bit channels form one group), and
each group is coded under its own empirical distribution, whose symbol counts the file stores,
with constriction's ANS coder (a maintained Rust library with Python bindings). A group's
symbol is a code's B-bit field u = q + 2^(B-1) in 0..2^B-1. The bitstream this replaces is
rebuilt exactly before decoding, so everything downstream of it is the plain format's.

Groups are encoded in reverse order on one ANS stack, so a decoder pops them in file order.
docs/format.md ("Entropy-coded payload") is the specification.
"""

from __future__ import annotations

import math

import numpy as np

from scn.errors import FormatError
from scn.packing import pack_codes, unpack_codes

CODING = "ans-categorical"  # the header's `coding.codes`
WORDS, COUNTS = "codes_ans", "code_counts"  # the tensors that replace `codes`
_MAX_SYMBOLS = 1 << 32


def _layer_streams(layers: list[dict], bits: np.ndarray):
    """(entry, its channels' bit depths, M) for each quantized layer, in file order."""
    pos = 0
    for entry in layers:
        if not entry["quantized"]:
            continue
        o = int(entry["shape"][0])
        m = int(entry["live_inputs"]) * math.prod(int(k) for k in entry["shape"][2:])
        if pos + o > len(bits):
            raise FormatError("the bits tensor is shorter than the layers the header lists; the "
                              "file is corrupt.")
        yield entry, bits[pos:pos + o].astype(np.int64), m
        pos += o


def _groups(layer_bits: np.ndarray) -> list[int]:
    """The bit depths of a layer's groups, ascending (0-bit channels have no codes)."""
    return [int(b) for b in np.unique(layer_bits) if b > 0]


def _model(counts: np.ndarray):
    import constriction

    return constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)


def compress(tensors: dict[str, np.ndarray], layers: list[dict]) -> dict[str, np.ndarray]:
    """`tensors` with the raw `codes` bitstream replaced by an ANS stream and its count tables."""
    import constriction

    raw, pos = tensors["codes"], 0
    groups: list[tuple[np.ndarray, np.ndarray]] = []  # (symbols, counts)
    for _entry, bits, m in _layer_streams(layers, tensors["bits"]):
        nbytes = -(-m * int(bits.sum()) // 8)
        codes = unpack_codes(raw[pos:pos + nbytes], bits, m)
        pos += nbytes
        for b in _groups(bits):
            symbols = (codes[bits == b] + (1 << (b - 1))).reshape(-1).astype(np.int32)
            groups.append((symbols, np.bincount(symbols, minlength=1 << b).astype(np.uint32)))
    coder = constriction.stream.stack.AnsCoder()
    for symbols, counts in reversed(groups):
        if symbols.size:
            coder.encode_reverse(symbols, _model(counts))
    out = {k: v for k, v in tensors.items() if k != "codes"}
    out[WORDS] = coder.get_compressed().astype(np.uint32)
    out[COUNTS] = np.concatenate([c for _, c in groups]) if groups else np.zeros(0, np.uint32)
    return out


def expand(tensors: dict[str, np.ndarray], layers: list[dict]) -> dict[str, np.ndarray]:
    """Inverse of `compress`: the tensors with the plain `codes` bitstream, rebuilt exactly."""
    import constriction

    for name, dtype in ((WORDS, np.uint32), (COUNTS, np.uint32)):
        if name not in tensors or tensors[name].dtype != dtype or tensors[name].ndim != 1:
            raise FormatError(f"the file's header says its payload is entropy coded, but it has no "
                              f"flat {np.dtype(dtype)} tensor {name!r}; the file is corrupt.")
    if "codes" in tensors:
        raise FormatError("the file holds both a plain and an entropy-coded payload; it is corrupt.")
    if "bits" not in tensors:
        raise FormatError("the file lacks the 'bits' tensor; it is not a complete .scn file.")
    counts_all, at = tensors[COUNTS].astype(np.int64), 0
    coder = constriction.stream.stack.AnsCoder(tensors[WORDS].copy())
    streams = []
    for entry, bits, m in _layer_streams(layers, tensors["bits"]):
        codes = np.zeros((len(bits), m), dtype=np.int32)
        for b in _groups(bits):
            counts = counts_all[at:at + (1 << b)]
            at += 1 << b
            n = int((bits == b).sum()) * m
            if len(counts) != 1 << b or int(counts.sum()) != n or n >= _MAX_SYMBOLS:
                raise FormatError(f"layer {entry['name']!r}: the entropy coder's symbol counts do "
                                  "not match its channels; the file is corrupt.")
            if n:
                try:
                    symbols = np.asarray(coder.decode(_model(counts.astype(np.float64)), n))
                except Exception as exc:  # constriction raises its own types
                    raise FormatError(f"the entropy-coded payload cannot be decoded ({exc}); the "
                                      "file is corrupt.") from None
                if not np.array_equal(np.bincount(symbols, minlength=1 << b)[:1 << b], counts):
                    raise FormatError(f"layer {entry['name']!r}: the entropy-coded payload does not "
                                      "decode to its recorded symbol counts; the file is corrupt.")
                codes[bits == b] = (symbols.astype(np.int32) - (1 << (b - 1))).reshape(-1, m)
        streams.append(pack_codes(codes, bits))
    if at != len(counts_all) or not coder.is_empty():
        raise FormatError("the entropy-coded payload is longer than its layers need; the file is "
                          "corrupt.")
    out = {k: v for k, v in tensors.items() if k not in (WORDS, COUNTS)}
    out["codes"] = np.concatenate(streams).astype(np.uint8) if streams else np.zeros(0, np.uint8)
    return out


def coded(header: dict, name: str) -> bool:
    """Whether the payload is entropy coded (version 2), refusing codings scn does not know."""
    coding = header.get("coding")
    if (header["version"] == 2) != (coding is not None):
        raise FormatError(f"{name}: version {header['version']} with coding {coding!r}; an "
                          "entropy-coded payload is version 2 and only that. The file is corrupt.")
    if coding is not None and coding != {"codes": CODING}:
        raise FormatError(f"{name} codes its payload as {coding!r}, which this scn does not "
                          f"decode (it knows {CODING!r}). Upgrade scn.")
    return coding is not None
