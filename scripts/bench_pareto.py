r"""Accuracy against size for every method on Fashion-MNIST, in one resumable invocation.

Same model, data, epochs and seed (+experiment=fashion_mnist_bench) for every point:
  none           float32, the accuracy reference;
  fixed          fixed-bit QAT with learned exponents at 8, 6, 4, 3 and 2 bits;
  diffq          DiffQ (pip install '.[diffq]') over its size penalty;
  self_compress  self-compression over gamma, and the channel-removal recipe;
  self_compress_channels  the default job's method over its channel charge (gamma 0.01).
Run folders live under --runs, shared with bench_fashion_mnist.py (a run both need is trained
once); a finished run is reused, so a killed benchmark resumes where it stopped. The table and
plots come from scn.aggregate and scn.sweep_report, the same code as `scn-report`. The
self-compression points are the folders of the gamma sweep, which this one command makes
(and `scn-report` reports on):

    scn-train -m +experiment=fashion_mnist_bench size_loss.gamma=0.02,0.05,0.1,0.2,0.4,1.0 \
        hydra.sweep.dir=outputs/bench/fashion_mnist/gamma_sweep 'hydra.sweep.subdir=gamma_${size_loss.gamma}'

Writes docs/results/pareto.csv, pareto.json, pareto_bytes.png and pareto_bits.png.

    python scripts/bench_pareto.py                       # every point at 8 epochs: ~90 min on 2 cores
    python scripts/bench_pareto.py trainer.max_epochs=2  # a quick look: two epochs a point
    python scripts/bench_pareto.py trainer.max_epochs=16 --runs outputs/bench/fashion_mnist_e16 \
        --name pareto_e16 --only none fixed4 fixed3 fixed2 diffq_i4_p3 diffq_i4_p100 \
        gamma_sweep/gamma_0.1 channels_x5 channels_x6 channels_x7 channels_x8.5
        # the default job's 16 epochs: its method against the baselines (docs/results.md)
"""

from __future__ import annotations

import harness

from scn import aggregate, report, sweep_report
from scn.sweep import run_overrides

GAMMAS = (0.02, 0.05, 0.1, 0.2, 0.4, 1.0)
FIXED_BITS = (8, 6, 4, 3, 2)
DIFFQ_PENALTIES = (1, 3, 100, 1000)  # its penalty is on megabytes: a 0.25 MB CNN needs large ones
# From DiffQ's default 8 bits its bit depths move too slowly to pass 4.5 bits/weight in 8
# epochs, whatever the penalty: these start lower, for its front below 4 bits/weight.
DIFFQ_LOW_BITS = {"diffq_i4_p3": (4, 3), "diffq_i4_p100": (4, 100)}  # name: (init bits, penalty)
REMOVAL_RECIPE = ["quant=self_compress_removal", "size_loss=kill_early", "trainer.lr_quant=0.02"]
# The default job's method (+experiment=fashion_mnist_cnn) over its channel charge, at its gamma.
CHARGES = (5, 6, 7, 8.5)


def points() -> list[tuple[str, str, float | None, list[str]]]:
    """(run name, method, knob, overrides) for every point of the plot."""
    pts = [("none", "none", None, ["quant=none"])]
    pts += [(f"fixed{b}", "fixed", b, ["quant=fixed", f"quant.init_bits={b}"]) for b in FIXED_BITS]
    # DiffQ's own default: its size penalty at full weight from the first step.
    pts += [(f"diffq_p{p:g}", "diffq", p, ["quant=diffq", "size_loss=constant", f"size_loss.gamma={p}"])
            for p in DIFFQ_PENALTIES]
    pts += [(name, "diffq", p, ["quant=diffq", f"quant.init_bits={b}", "size_loss=constant",
                                f"size_loss.gamma={p}"]) for name, (b, p) in DIFFQ_LOW_BITS.items()]
    # The folders of the gamma sweep (module docstring): the same runs, trained once.
    pts += [(f"gamma_sweep/gamma_{g}", "self_compress", g,
             ["quant=self_compress", f"size_loss.gamma={g}"]) for g in GAMMAS]
    # The channel-removal recipe (+experiment=fashion_mnist_removal), its gamma as the knob.
    pts.append(("removal_recipe", "self_compress_removal", 0.3, REMOVAL_RECIPE))
    pts += [(f"channels_x{c:g}", "self_compress_channels", c,
             ["quant=self_compress_channels", f"quant.live_input_grad={c:g}", "size_loss.gamma=0.01"])
            for c in CHARGES]
    return pts


def point_label(method: str, knob: float | None) -> str:
    """How the plots name a point: its method's knob in that method's words."""
    if knob is None:
        return "float32"
    words = {"fixed": f"{knob:g} bits", "diffq": f"penalty {knob:g}",
             "self_compress_channels": f"charge x{knob:g}"}
    return words.get(method, f"γ={knob:g}")


def _options(parser) -> None:
    parser.add_argument("--skip", nargs="*", default=[], help="methods to leave out")
    parser.add_argument("--only", nargs="*", default=None, help="run names to keep (default: all)")
    parser.add_argument("--name", default="pareto", help="result file stem in --out")


def main(argv: list[str] | None = None) -> None:
    args = harness.arguments(
        __doc__, runs="outputs/bench/fashion_mnist", argv=argv,
        overrides_help="extra Hydra overrides for every point",
        add=_options)

    knobs = {}
    for name, method, knob, overrides in points():
        if method in args.skip or (args.only is not None and name not in args.only):
            continue
        run_overrides(["+experiment=fashion_mnist_bench", *overrides, *args.overrides], args.runs / name)
        knobs[name] = (method, knob)

    rows = [r for r in aggregate.collect(args.runs) if r["run_dir"] in knobs]
    for r in rows:
        r["method"], r["knob"] = knobs[r["run_dir"]]
        r["label"] = r["method"]
        r["point_label"] = point_label(r["method"], r["knob"])
        r["run_dir"] = harness.relative(args.runs / r["run_dir"])
    aggregate.mark_pareto(rows)
    columns = ["method", "knob", "test_accuracy", "bits_per_weight", "file_bytes", "bytes_source",
               "diffq_true_bytes",
               "float_bits_pct", "weights_left_pct", "param_count", "pareto", "pareto_bytes",
               "wall_time_s", "status", "run_dir"]
    table = [{k: r.get(k) for k in columns} for r in rows]
    report.write_csv(args.out / f"{args.name}.csv", table)
    harness.write(args, __file__, args.name, table)
    sweep_report.plot_pareto(rows, "file_bytes", args.out / f"{args.name}_bytes.png", log_x=True)
    sweep_report.plot_pareto(rows, "bits_per_weight", args.out / f"{args.name}_bits.png")
    for r in sorted(table, key=lambda r: (r["method"], r["bits_per_weight"] or 0)):
        print(f"{r['method']:>14} {r['knob'] if r['knob'] is not None else '':>6}: "
              f"{r['test_accuracy']:6.2f}%  {r['bits_per_weight']:6.3f} bits/weight  "
              f"{r['file_bytes']:>9} bytes{'  pareto' if r['pareto_bytes'] else ''}")


if __name__ == "__main__":
    main()
