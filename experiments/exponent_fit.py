"""How far each layer's learned exponents sit from the least-squares ones, and how much they clip.

For every quantized layer of a trained run (its model.safetensors: the latent float weights,
bit depths and exponents): the share of live weights that the learned exponent clips (more than
half a step outside the code range), how many steps the least-squares exponent at the stored
bit depth lies above the learned one (channels per step), and the squared quantization error of
the learned exponents over the least-squares ones (docs/study/channel_removal.md, seventh round).

    python experiments/exponent_fit.py outputs/study_cifar/lig15_min3_init6/model.safetensors
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

from scn.checkpoint import load_checkpoint
from scn.quant import SCLayer, best_exponents, quantize, sc_layers


def layer_fit(layer: SCLayer) -> dict:
    """Clipped share, least-squares exponent minus learned (channels per step), error ratio."""
    bits = layer.int_bits()
    live = bits > 0
    w, b, e = layer.weight.detach()[live].flatten(1), bits[live], layer.int_exponents()[live]
    best = best_exponents(w, b, e.float(), reach=6).long()
    high = (2 ** (b - 1) - 1).unsqueeze(1)

    def error(exponent: torch.Tensor) -> torch.Tensor:
        return ((w - quantize(w, b.float(), exponent.float())) ** 2).sum()

    x = w / torch.exp2(e.float()).unsqueeze(1)
    clipped = ((x < -high - 1.5) | (x > high + 0.5)).float().mean()
    return {"clipped_pct": 100 * float(clipped), "steps": dict(sorted(Counter((best - e).tolist()).items())),
            "error_ratio": float(error(e) / error(best).clamp(min=1e-30))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="model.safetensors of finished runs")
    args = parser.parse_args(argv)
    for path in args.paths:
        model, _ = load_checkpoint(path)
        print(path)
        for name, layer in sc_layers(model):
            if layer.quantized and bool((layer.int_bits() > 0).any()):
                fit = layer_fit(layer)
                print(f"  {name:18} clipped {fit['clipped_pct']:5.1f}%   least-squares e - learned e "
                      f"(channels): {fit['steps']}   error learned/least-squares {fit['error_ratio']:.2f}")


if __name__ == "__main__":
    main()
