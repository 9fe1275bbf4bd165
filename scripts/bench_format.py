"""The .scn format on trained models: file size against the ideal size and float32, save/load
time, the entropy-coded payload, and the ONNX exports.

For each run folder (default: the Fashion-MNIST benchmark's, outputs/bench/fashion_mnist/
<method>/ for none, fixed8, fixed4 and self_compress, and the CIFAR-10 CPU benchmark's
self-compression run when it exists) it loads model.safetensors, saves the model as .scn, and
compares the file with the size accounting (ideal bytes = total bits / 8) and with float32;
save and load times are medians of --repeat runs. Self-compressed runs get a second record,
`<method>_entropy`: the same model with an entropy-coded payload (format version 2). Every
record also carries the sizes of the float and integer (QDQ) ONNX exports and, under
onnxruntime, the share of the test set's predictions the integer export shares with scn.
Writes format.json and format.png (--name) to --out (default docs/results).

    python scripts/bench_format.py --cifar10-root DIR               # the committed numbers
    python scripts/bench_format.py RUN_DIR [RUN_DIR ...] --out /tmp/fmt  # other runs
    python scripts/bench_format.py outputs/bench/self_compress_default_job --name format_default_job
        # the default job's run, trained with hydra.run.dir=outputs/bench/self_compress_default_job
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import harness
import matplotlib.pyplot as plt
from harness import ROOT

from scn import checkpoint, eval_cli, onnx_export, size
from scn import format as scn_format

METHODS = ("none", "fixed8", "fixed4", "self_compress")
DEFAULT_RUNS = ROOT / "outputs/bench/fashion_mnist"
CIFAR10_RUN = ROOT / "outputs/bench/cifar10_cpu/self_compress"


def timed(fn, repeat: int) -> tuple[float, object]:
    """Median wall time of `repeat` calls, and the last call's result."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def measure(run_dir: Path, method: str, repeat: int, workdir: Path, root: str | None,
            entropy_coded: bool = False, onnx: dict | None = None) -> dict:
    """One record; `onnx`: the ONNX fields of a record of the same model (not exported again)."""
    model, header = checkpoint.load_checkpoint(run_dir / "model.safetensors")
    path = workdir / f"{method}.scn"
    save_s, file_bytes = timed(lambda: scn_format.save(model, path, header.get("dataset"),
                                                       entropy_coded), repeat)
    load_s, (loaded, _) = timed(lambda: scn_format.load(path), repeat)
    rep = size.report(model)  # the trained model as the accounting counts it
    stats = scn_format.file_stats(path)
    return {
        "method": method,
        "run_dir": harness.relative(run_dir),
        "file_bytes": file_bytes,
        "ideal_bytes": rep.ideal_bytes,
        "payload_bytes": stats["payload_bytes"],
        "payload_ideal_bytes": rep.payload_ideal_bytes,
        "float32_bytes": rep.float32_bytes,
        "float_bytes": stats["float_bytes"],
        "meta_bytes": stats["meta_bytes"],
        "overhead_bytes": stats["overhead_bytes"],
        "bits_per_weight": rep.bits_per_weight,
        "file_bits_per_weight": 8 * file_bytes / rep.reference_scalars,
        "file_vs_ideal": file_bytes / rep.ideal_bytes,
        "compression_vs_float32": rep.float32_bytes / file_bytes,
        "save_s": save_s,
        "load_s": load_s,
        "format_version": scn_format.read_header(path)["version"],
        "dataset": (header.get("dataset") or {}).get("name"),
        **(onnx or onnx_sizes(loaded, header, workdir / method, root)),
    }


def onnx_sizes(model, header: dict, stem: Path, root: str | None) -> dict:
    """Both ONNX forms' bytes, and how the integer one's predictions compare with scn's."""
    data = eval_cli.load_dataset(None, header, root)
    sizes = {form: onnx_export.export_onnx(model, stem.with_suffix(f".{form}.onnx"), form,
                                           tuple(data.input_shape)) for form in onnx_export.FORMS}
    agreement = onnx_export.compare(stem.with_suffix(".qdq.onnx"), model, data.normalize(data.test_x))
    return {"onnx_float_bytes": sizes["float"], "onnx_qdq_bytes": sizes["qdq"],
            "onnx_qdq_vs_float": sizes["qdq"] / sizes["float"], **agreement}


def plot(results: list[dict], path: Path) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8))
    names = [r["method"] for r in results]
    x = range(len(results))
    width = 0.2
    for i, (key, label) in enumerate([("float32_bytes", "float32"), ("ideal_bytes", "ideal (bits / 8)"),
                                      ("file_bytes", ".scn file"), ("onnx_qdq_bytes", "ONNX, integer")]):
        a.bar([j + (i - 1.5) * width for j in x], [r[key] for r in results], width, label=label)
    for j, r in zip(x, results, strict=True):
        a.annotate(f"{r['file_vs_ideal']:.2f}x", (j + 0.5 * width, r["file_bytes"]), ha="center",
                   va="bottom", fontsize=7, textcoords="offset points", xytext=(0, 2))
    a.set_xticks(list(x), names, rotation=25, ha="right", fontsize=8)
    a.set(yscale="log", ylabel="bytes (log scale)",
          title="model size: float32, ideal, .scn file, integer ONNX",
          ylim=(None, 2.5 * max(max(r["file_bytes"], r["float32_bytes"]) for r in results)))
    a.legend(loc="upper right", ncol=2, fontsize=7)
    a.grid(alpha=0.3, axis="y", which="both")
    b.bar([j - width / 2 for j in x], [r["save_s"] * 1000 for r in results], width, label="save")
    b.bar([j + width / 2 for j in x], [r["load_s"] * 1000 for r in results], width, label="load")
    b.set_xticks(list(x), names, rotation=25, ha="right", fontsize=8)
    b.set(ylabel="milliseconds (median)", title="save and load time")
    b.legend(loc="upper left", fontsize=8)
    harness.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path,
                        help=f"run folders holding model.safetensors (default: {DEFAULT_RUNS}/<method>)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results")
    parser.add_argument("--repeat", type=int, default=5, help="timings are medians of this many runs")
    parser.add_argument("--root", help="the Fashion-MNIST (or other) data, for the ONNX check")
    parser.add_argument("--cifar10-run", type=Path, default=CIFAR10_RUN,
                        help="the CIFAR-10 CPU self-compression run (included when it exists)")
    parser.add_argument("--cifar10-root", help="its data: the CIFAR-10 folder")
    parser.add_argument("--name", default="format", help="result file stem in --out")
    args = parser.parse_intermixed_args(argv)  # overrides and options in any order
    args.argv = sys.argv[1:] if argv is None else argv
    runs = [(p.name, p, args.root) for p in args.runs] or [(m, DEFAULT_RUNS / m, args.root) for m in METHODS]
    if not args.runs and (args.cifar10_run / "model.safetensors").is_file():
        runs.append(("cifar10_cpu_self_compress", args.cifar10_run, args.cifar10_root))
    missing = [str(p) for _, p, _ in runs if not (p / "model.safetensors").is_file()]
    if missing:
        print(f"bench_format: error: no model.safetensors in {', '.join(missing)}; run "
              "scripts/bench_fashion_mnist.py first, or name run folders.", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for method, path, root in runs:
            results.append(measure(path, method, args.repeat, Path(tmp), root))
            if "self_compress" in method:  # the same model: its ONNX files are the plain record's
                onnx = {k: v for k, v in results[-1].items() if k.startswith("onnx_")}
                results.append(measure(path, f"{method}_entropy", args.repeat, Path(tmp), root, True,
                                       onnx))
    harness.write(args, __file__, args.name, results)
    plot(results, args.out / f"{args.name}.png")
    for r in results:
        print(f"{r['method']:>14}: file {r['file_bytes']:>9,} B  ideal {r['ideal_bytes']:>11,.1f} B "
              f"({r['file_vs_ideal']:.3f}x)  payload {r['payload_bytes']:>8,} / "
              f"{r['payload_ideal_bytes']:,.1f} B  "
              f"float32 {r['float32_bytes']:>9,} B ({r['compression_vs_float32']:.1f}x smaller)  "
              f"save {r['save_s'] * 1000:.1f} ms  load {r['load_s'] * 1000:.1f} ms  "
              f"onnx {r['onnx_float_bytes']:,} / {r['onnx_qdq_bytes']:,} B "
              f"({r['onnx_qdq_vs_float']:.3f}x), {100 * r['onnx_equal_predictions']:.2f}% equal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
