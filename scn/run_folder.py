"""The run folder a training run reports to: its CSVs, curves and training checkpoints.

    metrics.csv        one row per evaluation (scn.train.Trainer.metrics_row, plus file_bytes)
    train_log.csv      one row per training step: loss, size term, gamma, lr
    curves.png         accuracy vs bits/weight, bits and accuracy over steps, channels left
    checkpoint/train_state.safetensors   the training state, for resuming (scn.resume)

Every file is written atomically (scn.io). scn.experiment writes the rest (summary.json,
model.safetensors, model.scn) when the run ends.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from scn import distributed, report
from scn import format as scn_format
from scn import resume as train_state
from scn.loggers import Logger
from scn.train import Reporter, Trainer


class RunFolder(Reporter):
    """Writes what a Trainer reports into `path`; holds the rows the CSVs are made of."""

    def __init__(self, path: Path, model: nn.Module, title: str, dataset: dict, config_hash: str,
                 config: dict | None, state: train_state.State | None = None,
                 packs: bool = True, logger: Logger | None = None) -> None:
        self.path = path
        self.model = model
        self.title = title
        self.dataset = dataset
        self.config_hash = config_hash
        self.config = config
        self.packs = packs  # whether the method writes model.scn (scn.methods.Method.packs)
        self.wants_checkpoints = packs  # and training checkpoints
        rows = state.meta["rows"] if state else {"metrics": [], "train_log": []}
        self.history: list[dict] = rows["metrics"]
        self.steps: list[dict] = rows["train_log"]
        self.resumes: list[int] = [*state.meta.get("resumes", []), state.step] if state else []
        self.checkpoint_step: int | None = state.step if state else None
        self.logger = logger
        if logger is not None:
            logger.open(path, config, state.step if state else 0)
        if state:  # the CSVs hold exactly the checkpoint's rows, as an uninterrupted run's would
            self._write_rows("metrics.csv", self.history)
            self._write_rows("train_log.csv", self.steps)
            report.plot_curves(self.history, path / "curves.png", title=title)

    def evaluated(self, row: dict) -> None:
        if self.packs:  # the real size of the packed file at this point (encoded in memory, ~0.1 s)
            row["file_bytes"] = len(scn_format.to_bytes(self.model, self.dataset))
        self.history.append(row)
        report.write_csv(self.path / "metrics.csv", self.history)
        if self.logger is not None:
            self.logger.evaluated(row)
        report.plot_curves(self.history, self.path / "curves.png", title=self.title)

    def logged(self, rows: list[dict]) -> None:
        self.steps.extend(rows)
        report.write_csv(self.path / "train_log.csv", self.steps)
        if self.logger is not None:
            self.logger.steps(rows)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()

    def checkpoint(self, trainer: Trainer) -> None:
        snapshot = train_state.capture(trainer, self.dataset, config_hash=self.config_hash,
                                       config=self.config, resumes=self.resumes,
                                       world_size=distributed.world_size(),
                                       rows={"metrics": self.history, "train_log": self.steps})
        train_state.save(train_state.path_in(self.path), snapshot)
        self.checkpoint_step = trainer.step

    def _write_rows(self, name: str, rows: list[dict]) -> None:
        if rows:
            report.write_csv(self.path / name, rows)
        else:
            (self.path / name).unlink(missing_ok=True)
