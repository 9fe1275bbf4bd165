"""Step-cost benchmark: one training step of float, fixed-bit QAT and self-compression, side by side.

Every record is one `method` (none, fixed, self_compress) x `model` x `compile` (eager, or
torch.compile with inductor): `ops_per_step`, the ATen operations one training step dispatches
(a `torch._foreach_*` operation counts once, as one dispatch for all its tensors; eager steps
only), and `step_ms`, the median over timed
rounds of `scn.train.Trainer.train_step` (forward, size term, backward, AdamW, lr schedule),
the methods timed in turns so that the machine's drift falls on all alike; the compile time is
reported apart, and `quantizer_ms` is the fused quantizer alone (forward and backward, all layers
and Q), timed on its own: its share of a step, without the step's noise. Models: SmallCNN at
the default job's width (16, Fashion-MNIST's 28x28x1,
batch 128) and ResNet-9 at the CPU recipe's width (16, 32x32x3, batch 256). On a CUDA device,
also the full recipe's ResNet-9 (width 64, batch 512, bf16 autocast) and that self-compressing
model shrunk by surgery to about a third of its weights. Writes docs/results/step.json and
step.png.

    python scripts/bench_step.py --rounds 25           # the committed numbers (about 12 minutes)
    python scripts/bench_step.py --rounds 3 --no-compile --out /tmp/step   # a quick look
"""

from __future__ import annotations

import collections
import statistics
import time

import harness
import matplotlib.pyplot as plt
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from scn import fused, size
from scn.data import synthetic
from scn.methods import Scheme, quantize_
from scn.models import build
from scn.schedule import Constant
from scn.train import TrainConfig, Trainer, pick_device

METHODS = ("none", "fixed", "self_compress")
# name -> (builder, width, channels, image size, batch, device types it runs on)
MODELS = {
    "SmallCNN": ("SmallCNN", 16, 1, 28, 128, ("cpu", "cuda")),
    "ResNet9": ("ResNet9", 16, 3, 32, 256, ("cpu", "cuda")),
    "ResNet9_full": ("ResNet9", 64, 3, 32, 512, ("cuda",)),
}
SHRUNK_KEEP = 0.58  # of each layer's channels: about a third of the weights (0.58^2)


class CountOps(TorchDispatchMode):
    """Counts the ATen operations dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


class Bench:
    """One method x model x compile: a trainer and a fixed batch, timed step by step."""

    def __init__(self, method: str, model: str, compiled: bool, device: torch.device,
                 shrink: bool = False) -> None:
        builder, width, channels, image, batch, _ = MODELS[model]
        self.record = {"method": method, "model": model, "compile": compiled,
                       "device": device.type, "width": width, "batch_size": batch}
        torch.manual_seed(0)
        net = build(builder, in_channels=channels, num_classes=10, width=width, image_size=image)
        net = quantize_(net, Scheme(kind=method, init_bits=3 if method == "self_compress" else 4))
        data = synthetic(num_train=batch, num_test=64, num_classes=10, image_size=image,
                         channels=channels)
        cfg = TrainConfig(max_steps=10**6, max_epochs=10**6, batch_size=batch, compile=compiled,
                          device=str(device), progress=False, prune_every=10**6)
        self.trainer = Trainer(net, data, cfg, Constant(gamma=0.01), method == "self_compress")
        if shrink:
            self._shrink()
        self.record["weights_left_pct"] = size.report(self.trainer.model).weights_left_pct
        x = self.trainer.data.normalize(self.trainer.data.train_x[:batch])
        if self.trainer.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.x, self.y = x, self.trainer.data.train_y[:batch]
        self.times: list[float] = []

    def _shrink(self) -> None:
        """Kill the last channels of every layer but the classifier, then remove them."""
        layers = [m for _, m in self.trainer.model.named_modules() if getattr(m, "b", None) is not None]
        with torch.no_grad():
            for m in layers[:-1]:
                keep = max(8, round(SHRUNK_KEEP * m.b.shape[0] / 8) * 8)
                m.b[keep:] = -1.0
        self.trainer.prune(physical=True)
        self.record["shrunk"] = True

    def step(self) -> None:
        self.trainer.train_step(self.x, self.y, 0.01)

    def sync(self) -> None:
        if self.trainer.cuda:
            torch.cuda.synchronize(self.trainer.device)

    def warm_up(self) -> None:
        """The first steps: optimizer state, and the compilation when compiled (timed apart)."""
        t0 = time.perf_counter()
        self.step()
        self.sync()
        self.record["compile_time_s"] = (time.perf_counter() - t0) if self.record["compile"] else 0.0
        for _ in range(2):
            self.step()
        self.sync()

    def count_ops(self) -> None:
        if self.record["compile"]:  # under a dispatch mode the compiled step would run eagerly
            self.record["ops_per_step"] = None
            self.record["ops_note"] = ("not counted: inductor's kernels do not pass through the "
                                       "ATen dispatcher, and under a dispatch mode the step runs eagerly")
            return
        try:
            with CountOps() as counter:
                self.step()
            self.record["ops_per_step"] = sum(counter.counts.values())
        except Exception as err:  # noqa: BLE001 (a compiled step may refuse a dispatch mode)
            self.record["ops_per_step"] = None
            self.record["ops_note"] = f"not countable: {type(err).__name__}"

    def time_quantizer(self, rounds: int) -> None:
        """The fused function alone (every layer's weights and Q, forward and backward), timed
        in the same process: the quantizer's share of a step, free of the step's own noise."""
        plan = fused.plan_of(self.trainer.model)
        if self.record["compile"] or plan is None:
            return
        size_inputs = getattr(self.trainer.size, "fused_inputs", None)
        times = []
        for _ in range(rounds):
            self.sync()
            t0 = time.perf_counter()
            outs = fused.quantized_weights(plan, size_inputs)
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
            self.sync()
            times.append(time.perf_counter() - t0)
        self.trainer.optimizer.zero_grad(set_to_none=True)
        self.record["quantizer_ms"] = 1000 * statistics.median(times)

    def timed(self, steps: int) -> None:
        self.sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.sync()
        self.times.append((time.perf_counter() - t0) / steps)


def add_arguments(parser) -> None:
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per record")
    parser.add_argument("--steps", type=int, default=2, help="steps per timed round")
    parser.add_argument("--no-compile", action="store_true", help="eager records only")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")


def main(argv: list[str] | None = None) -> None:
    args = harness.arguments(__doc__, runs=None, argv=argv, add=add_arguments,
                             overrides_help="(none: this benchmark takes no Hydra overrides)")
    device = pick_device(args.device)
    results = []
    for model, spec in MODELS.items():
        if device.type not in spec[-1]:
            continue
        for compiled in (False,) if args.no_compile else (False, True):
            group = [Bench(m, model, compiled, device) for m in METHODS]
            if model == "ResNet9_full":
                group.append(Bench("self_compress", model, compiled, device, shrink=True))
            for bench in group:
                bench.warm_up()
                bench.count_ops()
            for _ in range(args.rounds):  # in turns
                for bench in group:
                    bench.timed(args.steps)
            for bench in group:
                bench.time_quantizer(5 * args.rounds)
            results += [finish(b) for b in group]
            print_group(results[-len(group):])
    harness.write(args, __file__, "step", results, rounds=args.rounds, steps_per_round=args.steps)
    plot(results, args.out / "step.png")


def finish(bench: Bench) -> dict:
    record = dict(bench.record)
    record["step_ms"] = 1000 * statistics.median(bench.times)
    record["step_ms_spread"] = [1000 * min(bench.times), 1000 * max(bench.times)]
    return record


def print_group(group: list[dict]) -> None:
    base = next(r for r in group if r["method"] == "none")
    for r in group:
        ops = r["ops_per_step"]
        ratio = f"{ops / base['ops_per_step']:.3f}x" if ops and base["ops_per_step"] else "-"
        print(f"{r['model']:>12} {r['method']:>13}{' shrunk' if r.get('shrunk') else '':7} "
              f"compile={r['compile']!s:5} ops {ops!s:>5} ({ratio})  step {r['step_ms']:8.2f} ms "
              f"({r['step_ms'] / base['step_ms']:.3f}x float)"
              + (f"  quantizer {r['quantizer_ms']:.2f} ms" if "quantizer_ms" in r else ""))


def plot(results: list[dict], path) -> None:
    groups = sorted({(r["model"], r["compile"], r["device"]) for r in results}, key=str)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "ops_per_step", "ATen operations per step / float's"),
                           (axes[1], "step_ms", "step time / float step time")):
        for i, (model, compiled, dev) in enumerate(groups):
            rows = [r for r in results if (r["model"], r["compile"], r["device"]) == (model, compiled, dev)]
            base = next(r for r in rows if r["method"] == "none")
            for j, r in enumerate(rows):
                if r[key] is None or base[key] is None:
                    continue
                name = r["method"] + (" shrunk" if r.get("shrunk") else "")
                ax.bar(i + 0.2 * j, r[key] / base[key], width=0.2, color=f"C{j}",
                       label=name if i == 0 else None)
        ax.set_xticks([i + 0.3 for i in range(len(groups))],
                      [f"{m}\n{'compiled' if c else 'eager'} ({d})" for m, c, d in groups], fontsize=8)
        ax.axhline(1.0, color="gray", ls="--")
        ax.set(ylabel=label)
        ax.legend(fontsize=8)
    axes[0].set_title("operations dispatched per training step")
    axes[1].set_title("training step time")
    harness.save_figure(fig, path)


if __name__ == "__main__":
    main()
