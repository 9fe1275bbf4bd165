"""Loggers beside the run folder's own CSVs (config group `logger`; CSV alone is the default).

A logger receives what the run folder receives: the training steps' rows (loss, task loss,
size term, gamma, lr) and each evaluation's row (accuracy, bits/weight, weights left, channels
per layer, file bytes), plus the run's config once.

    scn-train logger=tensorboard            events in <run folder>/tensorboard
    tensorboard --logdir outputs/           every run's curves side by side
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from scn.errors import ConfigError

# Evaluation metrics logged (when a row has them), under eval/<name>; channels under channels/.
EVAL_KEYS = ("test_accuracy", "bits_per_weight", "float_bits_pct", "weights_left_pct", "param_count",
             "file_bytes", "ideal_bytes", "size_loss", "task_loss", "gamma")
STEP_KEYS = ("loss", "task_loss", "size_loss", "gamma", "lr")


class Logger(Protocol):
    def open(self, run_dir: Path, config: dict | None, start_step: int) -> None: ...
    def steps(self, rows: list[dict]) -> None: ...
    def evaluated(self, row: dict) -> None: ...
    def close(self) -> None: ...


class TensorBoard:
    """TensorBoard event files (torch.utils.tensorboard; needs the `tensorboard` package).

    log_dir: where the events go; None: <run folder>/tensorboard. A resumed run drops the
    events its killed predecessor wrote after the checkpoint (purge_step), so every curve is
    the one an uninterrupted run draws.
    """

    def __init__(self, log_dir: str | None = None, flush_secs: int = 30) -> None:
        if flush_secs <= 0:
            raise ConfigError(f"logger.flush_secs={flush_secs} must be a positive number of seconds.")
        try:
            import tensorboard  # noqa: F401  (SummaryWriter needs it; say so before training)
        except ImportError:
            raise ConfigError("logger=tensorboard needs the tensorboard package: pip install "
                              "'scn[tensorboard]' (or use the default logger=csv).") from None
        self.log_dir = log_dir
        self.flush_secs = flush_secs
        self.writer = None

    def open(self, run_dir: Path, config: dict | None, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        folder = Path(self.log_dir) if self.log_dir else Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(str(folder), flush_secs=self.flush_secs,
                                    purge_step=start_step if start_step else None)
        if not start_step and config is not None:
            text = json.dumps({k: v for k, v in config.items() if k != "hydra"}, indent=2)
            self.writer.add_text("config", f"```\n{text}\n```", 0)

    def steps(self, rows: list[dict]) -> None:
        for row in rows:
            for key in STEP_KEYS:
                if row.get(key) is not None:
                    self.writer.add_scalar(f"train/{key}", float(row[key]), int(row["step"]))

    def evaluated(self, row: dict) -> None:
        step = int(row["step"])
        for key in EVAL_KEYS:
            if row.get(key) is not None:
                self.writer.add_scalar(f"eval/{key}", float(row[key]), step)
        for key, value in row.items():
            if key.startswith("channels/"):
                self.writer.add_scalar(key, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
