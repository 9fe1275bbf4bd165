"""Which torchvision classification networks scn can self-compress, tried one by one.

For every builder torchvision lists (or those named): build it freshly initialised for 10
classes, convert it (`scn.quantize_`), give its BatchNorms random statistics, set 30% of its
channels to 0 bits, trace it, cut them (`scn.surgery.prune`) and compare the eval-mode outputs
before and after; then save it and load it into a fresh skeleton. Writes
docs/results/torchvision.json (one record per network: `ok`, the relative output error, the
parameters and FLOPs before and after, or the error scn gave) and torchvision.png.

    python scripts/check_torchvision.py                       # every builder (about 10 minutes here)
    python scripts/check_torchvision.py mobilenet_v2 densenet121 --out /tmp/tv
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import harness
import matplotlib.pyplot as plt
import torch
import torchvision
from torch import nn

import scn
from scn import size, surgery
from scn.errors import FormatError, SurgeryError
from scn.evaluation import flops
from scn.quant import sc_layers
from scn.torchvision_models import BUILDER_KWARGS

INPUT = (3, 64, 64)  # large enough for every convnet's stem to leave a spatial map
# Networks that need larger inputs: Inception v3 (>= 75 pixels); the transformers (their patch
# grids are fixed at 224).
SIZES = {"inception_v3": 96, **{a: 224 for a in ("maxvit_t", "swin_t", "swin_s", "swin_b", "swin_v2_t",
                                                 "swin_v2_s", "swin_v2_b", "vit_b_16", "vit_b_32",
                                                 "vit_l_16", "vit_l_32", "vit_h_14")}}
KILLED = 0.3


def fresh(arch: str) -> nn.Module:
    """`arch` freshly initialised for 10 classes (float; a load converts its skeleton)."""
    return torchvision.models.get_model(arch, weights=None, num_classes=10, **BUILDER_KWARGS.get(arch, {}))


def killed(model: nn.Module) -> nn.Module:
    """`model` converted, with random BatchNorm statistics and KILLED of its channels at 0 bits."""
    model = scn.quantize_(model, scn.SelfCompress(init_bits=6)).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 1)
            m.running_mean.normal_(0, 1)
            m.running_var.uniform_(0.5, 2.0)
    gen = torch.Generator().manual_seed(1)
    for _, layer in sc_layers(model):
        if layer.quantized:
            layer.b.data[torch.rand(layer.b.shape, generator=gen) < KILLED] = 0.2
    return model


def check(arch: str, max_params: float) -> dict:
    start = time.perf_counter()
    record: dict = {"arch": arch}
    torch.manual_seed(0)
    model = fresh(arch)
    params = sum(p.numel() for p in model.parameters())
    if params > max_params:
        return {**record, "ok": False, "error": f"skipped: {params:,} parameters (--max-params)",
                "seconds": time.perf_counter() - start}
    try:
        model = killed(model)
        shape = (3, SIZES.get(arch, INPUT[1]), SIZES.get(arch, INPUT[2]))
        record["input_shape"] = list(shape)
        x = torch.randn(2, *shape)
        graph = surgery.trace(model, x)
        surgery.settle_norms(model, graph)
        before_size = size.report(model).param_count
        flops_before = flops(model, x)
        with torch.no_grad():
            before = model(x)
        surgery.prune(model, graph, physical=True)
        with torch.no_grad():
            after = model(x)
        error = float((after - before).abs().max() / before.abs().max())
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.scn"
            scn.save(model, path, input_shape=shape)
            loaded, _ = scn.load(path, model=fresh(arch))
            with torch.no_grad():
                reloaded = loaded(x)
        record.update(ok=error < 1e-5 and torch.equal(reloaded, after), relative_error=error,
                      reload_equal=torch.equal(reloaded, after),
                      params_before=before_size, params_after=size.report(model).param_count,
                      flops_before=flops_before, flops_after=flops(model, x))
    except (SurgeryError, FormatError) as exc:  # scn's own refusals: what a user would read
        record.update(ok=False, error=f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # the network itself fails at this input (e.g. a ViT's fixed size)
        record.update(ok=False, error=f"{type(exc).__name__} (not from scn): {exc}")
    record["seconds"] = time.perf_counter() - start
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archs", nargs="*", help="builders to try (default: every classification builder)")
    parser.add_argument("--skip", nargs="*", default=[], help="builders to leave out")
    parser.add_argument("--max-params", type=float, default=150e6,
                        help="leave out larger networks (recorded as skipped)")
    parser.add_argument("--out", type=Path, default=harness.ROOT / "docs/results")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    archs = args.archs or torchvision.models.list_models(module=torchvision.models)
    results = []
    for arch in archs:
        if arch in args.skip:
            continue
        results.append(check(arch, args.max_params))
        r = results[-1]
        print(f"{arch:>22}: " + (f"ok, error {r['relative_error']:.1e}, parameters {r['params_before']:,} -> "
                                 f"{r['params_after']:,}" if r["ok"] else r.get("error", r)), flush=True)
    harness.write(args, __file__, "torchvision", results, input_shape=list(INPUT), killed_fraction=KILLED)
    plot(results, args.out / "torchvision.png")


def plot(results: list[dict], path: Path) -> None:
    done = [r for r in results if r["ok"]]
    fig, ax = plt.subplots(figsize=(12, 0.3 * len(done) + 1.5))
    ax.barh([r["arch"] for r in done], [100 * r["params_after"] / r["params_before"] for r in done])
    ax.set(xlabel=f"parameters left after cutting {KILLED:.0%} of the channels (%)",
           title=f"torchvision networks cut exactly ({len(done)} of {len(results)})")
    harness.save_figure(fig, path)


if __name__ == "__main__":
    main()
