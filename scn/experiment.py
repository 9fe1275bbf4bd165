"""One run, start to finish: build, train, and leave a complete run folder.

The run folder (every file written atomically):
    metrics.csv        one row per evaluation (see scn.train.Trainer.metrics_row)
    train_log.csv      one row per training step: loss, size term, gamma, lr
    summary.json       final figures at top level, best figures, status, config
    curves.png         accuracy vs bits/weight, bits and accuracy over steps, channels left
    model.safetensors  the trained (shrunk) model with float weights, b and e; reloadable
    model.scn          the same model packed: each channel's codes at its own bit depth
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from scn import checkpoint, io, report, size
from scn import format as scn_format
from scn.data import ImageData
from scn.errors import ScnError
from scn.quant import Scheme, quantize_
from scn.train import TrainConfig, TrainResult, train

SUMMARY_KEYS = ("test_accuracy", "bits_per_weight", "float_bits_pct", "weights_left_pct",
                "param_count", "wall_time_s", "status")


@dataclass
class Experiment:
    """Everything one run needs, as plain objects (the CLI builds it from Hydra configs)."""

    data: ImageData
    model: Callable[..., torch.nn.Module]  # scn.models.build with its name and arguments bound
    scheme: Scheme
    schedule: Callable[[int, int], float]
    trainer: TrainConfig
    seed: int = 0
    config: dict | None = None  # the resolved config, recorded in summary.json

    def build_model(self) -> torch.nn.Module:
        c, h, _ = self.data.input_shape
        torch.manual_seed(self.seed)  # the same initial weights for every scheme
        model = self.model(in_channels=c, num_classes=self.data.num_classes, image_size=h)
        return quantize_(model, self.scheme)

    def dataset_info(self) -> dict:
        return {"name": self.data.name, "classes": self.data.classes,
                "input_shape": list(self.data.input_shape),
                "mean": self.data.mean.tolist(), "std": self.data.std.tolist()}


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads"


# Keys that change nothing about the result: a run differing only in these is the same run.
_HASH_IGNORED = {("trainer", "progress"), ("trainer", "log_every")}


def config_hash(config: dict | None) -> str:
    """A short fingerprint of a resolved config, for recognising a run already done."""
    clean = {k: ({kk: vv for kk, vv in v.items() if (k, kk) not in _HASH_IGNORED}
                 if isinstance(v, dict) else v)
             for k, v in (config or {}).items() if k != "hydra"}
    text = json.dumps(clean, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_summary(run_dir: str | Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def finished_summary(run_dir: str | Path, digest: str) -> dict | None:
    """The summary of a finished run of this config in `run_dir`, or None."""
    summary = read_summary(run_dir)
    if summary and summary.get("status") == "finished" and summary.get("config_hash") == digest:
        return summary
    return None


def run(exp: Experiment, run_dir: str | Path) -> dict:
    """Train and write the run folder; returns the summary. Failures leave a 'failed' summary.

    A folder that already holds a finished run is never overwritten: the same config returns
    its summary (a re-launched sweep skips it), a different config is an error.
    """
    run_dir = Path(run_dir)
    digest = config_hash(exp.config)
    previous = read_summary(run_dir)
    if previous and previous.get("status") == "finished":
        if previous.get("config_hash") == digest:
            return previous
        raise ScnError(f"{run_dir} already holds a finished run of another config; scn never "
                       "overwrites a finished run. Choose another folder (hydra.run.dir=...).")
    run_dir.mkdir(parents=True, exist_ok=True)
    model = exp.build_model()
    history: list[dict] = []
    steps: list[dict] = []
    started = time.time()

    def on_eval(row: dict) -> None:
        # The real size of the packed file at this point (encoded in memory, ~0.1 s).
        row["file_bytes"] = len(scn_format.to_bytes(model, exp.dataset_info()))
        history.append(row)
        report.write_csv(run_dir / "metrics.csv", history)
        report.plot_curves(history, run_dir / "curves.png", title=_title(exp))

    def on_steps(rows: list[dict]) -> None:
        steps.extend(rows)
        report.write_csv(run_dir / "train_log.csv", steps)

    base = {"status": "running", "config_hash": digest, "config": exp.config, "machine": machine()}
    io.write_json(run_dir / "summary.json", base)
    try:
        result = train(model, exp.data, exp.trainer, exp.schedule, seed=exp.seed,
                       on_eval=on_eval, on_steps=on_steps)
    except BaseException as exc:  # a failure must still leave an honest summary behind
        failed = {**base, "status": "failed", "error": str(exc) or type(exc).__name__,
                  "wall_time_s": time.time() - started, "history_rows": len(history)}
        if history:
            failed.update({f"last_{k}": v for k, v in history[-1].items() if not k.startswith("channels/")})
        io.write_json(run_dir / "summary.json", failed)
        raise
    checkpoint.save_checkpoint(model, run_dir / "model.safetensors", exp.dataset_info())
    file_bytes = scn_format.save(model, run_dir / "model.scn", exp.dataset_info())
    summary = _summary(exp, model, result, base)
    summary["file_bytes"] = file_bytes
    io.write_json(run_dir / "summary.json", summary)
    return summary


def _title(exp: Experiment) -> str:
    name = getattr(exp.model, "keywords", {}).get("name", "model")
    return f"{exp.data.name} / {name} / {exp.scheme.kind}"


def _summary(exp: Experiment, model: torch.nn.Module, result: TrainResult, base: dict) -> dict:
    rep = size.report(model)
    final = result.final
    best = max(result.history, key=lambda r: r["test_accuracy"])
    return {
        "test_accuracy": final["test_accuracy"],
        "bits_per_weight": rep.bits_per_weight,
        "float_bits_pct": rep.float_bits_pct,
        "weights_left_pct": rep.weights_left_pct,
        "param_count": rep.param_count,
        "wall_time_s": result.wall_time_s,
        "status": "finished",
        "step_time_s": result.step_time_s,
        "images_per_s": result.images_per_s,
        "steps": final["step"],
        "surgeries": result.surgeries,
        "ideal_bytes": rep.ideal_bytes,
        "payload_ideal_bytes": rep.payload_ideal_bytes,
        "float32_bytes": rep.float32_bytes,
        "channels_left": {k: v[0] for k, v in rep.channels.items()},
        "dead_channels_kept": rep.dead_channels,
        "channels_original": {k: v[1] for k, v in rep.channels.items()},
        "best": {"test_accuracy": best["test_accuracy"], "step": best["step"],
                 "bits_per_weight": best["bits_per_weight"]},
        "machine": base["machine"],
        "config_hash": base["config_hash"],
        "config": exp.config,
    }
