"""Reporting for one run: metrics tables and the curves plot."""

from __future__ import annotations

import csv
import io as _io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from scn import io  # noqa: E402


def machine() -> str:
    """What ran this: the GPU's name, or the CPU (model, widest vector ISA, threads); and torch.

    CPU timings differ threefold between two "2-core x86_64" machines (AVX-512 or not), so a
    benchmark names the processor, not only its architecture."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{_cpu_name()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"


def _cpu_name() -> str:
    import platform

    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines()
                      if line.startswith("flags")), []))
    isa = next((f for f, flag in (("AVX-512", "avx512f"), ("AVX2", "avx2")) if flag in flags), None)
    return f"{name} ({isa})" if isa else name


def write_benchmark(path: str | Path, script: str, argv: list[str], results: list[dict],
                    **extra) -> None:
    """A benchmark's JSON: {"command", "machine", **extra, "results"} (the shape every scn
    benchmark shares), with the command line that reproduces it."""
    import shlex

    command = f"python {script} {shlex.join(argv)}".strip()
    io.write_json(path, {"command": command, "machine": machine(), **extra, "results": results})


def csv_text(rows: list[dict]) -> str:
    """Rows as CSV text; columns in first-seen order (later rows may add columns)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(v) for k, v in row.items()})
    return buf.getvalue()


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


def write_csv(path: str | Path, rows: list[dict]) -> None:
    io.write_text(path, csv_text(rows))


def read_csv(path: str | Path) -> list[dict]:
    """Rows of a CSV written by scn, numbers parsed back to float where they parse."""
    with open(path, newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(v: str):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def plot_curves(history: list[dict], path: str | Path, title: str = "") -> None:
    """Accuracy against bits/weight, bits/weight and accuracy over steps, channels left."""
    if not history:
        return
    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    a = ax[0, 0]
    a.plot([r["bits_per_weight"] for r in history], [r["test_accuracy"] for r in history], "o-")
    a.set(xlabel="bits per weight", ylabel="test accuracy (%)",
          title="accuracy vs size during training (\"end\" marks the final model)")
    a.annotate("end", (history[-1]["bits_per_weight"], history[-1]["test_accuracy"]))
    a = ax[0, 1]
    a.plot(steps, [r["bits_per_weight"] for r in history], "o-", label="bits per weight")
    a.set(xlabel="step", ylabel="bits per weight", title="size over training")
    twin = a.twinx()
    twin.plot(steps, [r["gamma"] for r in history], color="gray", ls="--", label="gamma")
    twin.set_ylabel("size-loss weight gamma")
    a.legend(loc="upper right")
    a = ax[1, 0]
    a.plot(steps, [r["test_accuracy"] for r in history], "o-")
    a.set(xlabel="step", ylabel="test accuracy (%)", title="accuracy over training")
    a = ax[1, 1]
    layers = [k for k in history[0] if k.startswith("channels/")]
    for key in layers:
        a.plot(steps, [r.get(key, float("nan")) for r in history], "o-" if len(layers) <= 12 else "-",
               lw=None if len(layers) <= 12 else 0.8, label=key.split("/", 1)[1])
    a.set(xlabel="step", ylabel="output channels left", title=f"channels left per layer ({len(layers)})")
    if len(layers) <= 12:  # a legend of a deep network's layers would cover the figure
        a.legend(fontsize="small", title="layer")
    for a in ax.flat:
        a.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    io.atomic_write(path, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)
