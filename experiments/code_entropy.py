"""How far below their bit count could a .scn file's codes be coded, losslessly?

Prints, for the codes of one file, the bits each model of their distribution would need,
against the codes' own bits (what the plain format stores): the empirical entropy per layer and
bit depth (what `scn.entropy` codes, tables not counted), per channel (tables not counted), and
adaptive coders that learn as they go (Krichevsky-Trofimov counts, nothing to store), per
channel and with two contexts inside each input's kernel: the previous code, and how many zeros
came before. Quoted in docs/results.md ("The packed file").

    python experiments/code_entropy.py RUN/model.scn
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict

import numpy as np

import scn
from scn.format import _codes_of
from scn.quant import sc_layers


def empirical_bits(symbols: np.ndarray, alphabet: int) -> float:
    """sum -log2 p(s) under the symbols' own frequencies (the table itself not counted)."""
    counts = np.bincount(symbols, minlength=alphabet)
    counts = counts[counts > 0]
    return float(-(counts * np.log2(counts / symbols.size)).sum())


def adaptive_bits(symbols: np.ndarray, contexts: list, alphabet: int) -> float:
    """What a sequential coder with add-1/2 counts per context pays, learning included."""
    counts: dict = defaultdict(lambda: np.full(alphabet, 0.5))
    total = 0.0
    for s, c in zip(symbols, contexts, strict=True):
        t = counts[c]
        total -= math.log2(t[s] / t.sum())
        t[s] += 1
    return total


def measure(path: str) -> dict[str, float]:
    model = scn.load(path)[0]
    out: dict[str, float] = defaultdict(float)
    for name, layer in sc_layers(model):
        if not layer.quantized:
            continue
        bits = layer.int_bits()
        codes = _codes_of(name, layer, layer.in_alive.bool(), bits, layer.int_exponents())
        kernel = layer.weight[0, 0].numel()
        groups: dict[int, list[np.ndarray]] = defaultdict(list)
        for o, b in enumerate(bits.tolist()):
            if b == 0:
                continue
            b = int(b)
            u = (codes[o] + (1 << (b - 1))).astype(np.int64)
            groups[b].append(u)
            alphabet, pos = 1 << b, np.arange(u.size) % kernel
            out["codes' bits"] += b * u.size
            out["per channel, empirical"] += empirical_bits(u, alphabet)
            out["per channel, adaptive"] += adaptive_bits(u, [0] * u.size, alphabet)
            previous = np.where(pos == 0, alphabet, np.concatenate([[alphabet], u[:-1]]))
            out["adaptive, previous code in the kernel"] += adaptive_bits(u, previous.tolist(), alphabet)
            zero, seen, zeros = 1 << (b - 1), 0, []
            for p, s in zip(pos, u, strict=True):
                seen = 0 if p == 0 else seen
                zeros.append((min(seen, 3), p == 0))
                seen += int(s == zero)
            out["adaptive, zeros before it in the kernel"] += adaptive_bits(u, zeros, alphabet)
        for b, parts in groups.items():
            out["per layer and bit depth, empirical (scn.entropy)"] += empirical_bits(
                np.concatenate(parts), 1 << b)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", help="a .scn file")
    totals = measure(p.parse_args().path)
    raw = totals["codes' bits"]
    for key, value in totals.items():
        print(f"{key:52s} {value / 8:10,.0f} bytes  {value / raw:.3f}x")


if __name__ == "__main__":
    main()
