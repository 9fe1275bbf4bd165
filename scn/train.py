"""The training loop: loss = task loss + gamma(t) * Q, with channel surgery every N steps.

Read top to bottom: pick the device, build the optimizer (weights and b/e in their own
groups), then for each batch compute the loss, step, and every `prune_every` steps remove
dead channels; every `eval_every` steps evaluate and hand a metrics row to `on_eval`.
The loop knows nothing about files: callers (scn.experiment) decide where rows go.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from scn import size, surgery
from scn.data import ImageData, batches
from scn.errors import ConfigError, NumericalError
from scn.quant import quant_parameters, sc_layers, weight_parameters

SURGERY_MODES = ("physical", "masked", "off")


@dataclass
class TrainConfig:
    """How to train. Every field is a `trainer.` key on the command line."""

    max_epochs: int = 8
    max_steps: int = 0  # > 0 stops early (tests, smoke runs)
    batch_size: int = 128
    lr: float = 3e-3  # weights (AdamW), with warm-up and cosine decay
    lr_quant: float = 0.02  # b and e (Adam, no weight decay)
    weight_decay: float = 5e-4
    warmup: float = 0.03  # fraction of training spent warming the learning rate up
    eval_every: int = 0  # steps between test evaluations; 0 = once per epoch
    log_every: int = 25  # steps between progress-bar updates (a host-device sync on GPU)
    surgery: str = "physical"  # physical: remove dead channels; masked: only mask them; off
    prune_every: int = 200  # steps between surgeries
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    amp: bool = True  # bf16 autocast on CUDA (CPU always runs float32)
    channels_last: bool = True
    compile: bool = False  # torch.compile the model (re-compiled after each surgery)
    progress: bool = True

    def __post_init__(self) -> None:
        positive = {"max_epochs": self.max_epochs, "batch_size": self.batch_size,
                    "log_every": self.log_every}
        for key, value in positive.items():
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"trainer.{key}={value!r} must be a positive integer.")
        for key in ("max_steps", "eval_every", "prune_every"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"trainer.{key}={value!r} must be an integer >= 0.")
        for key in ("lr", "lr_quant", "weight_decay"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
                raise ConfigError(f"trainer.{key}={value!r} must be a finite number >= 0.")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"trainer.warmup={self.warmup!r} must be a fraction in [0, 1).")
        if self.surgery not in SURGERY_MODES:
            raise ConfigError(f"trainer.surgery={self.surgery!r} is not one of {', '.join(SURGERY_MODES)}.")


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # one row per evaluation
    final: dict = field(default_factory=dict)
    wall_time_s: float = 0.0
    step_time_s: float = 0.0  # mean training step, evaluation and surgery excluded
    images_per_s: float = 0.0
    surgeries: int = 0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name!r} but CUDA is not available here; use "
                          "trainer.device=auto or cpu.")
    return device


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW for the weights; b and e in their own group: their own lr, no weight decay."""
    groups = [{"params": weight_parameters(model), "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    quant = quant_parameters(model)
    if quant:
        groups.append({"params": quant, "lr": cfg.lr_quant, "weight_decay": 0.0})
    return torch.optim.AdamW(groups)


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up then cosine decay to zero, as a multiplier of each group's lr."""
    ramp = warmup * total
    if step < ramp:
        return (step + 1) / ramp
    return 0.5 * (1 + math.cos(math.pi * min((step - ramp) / max(total - ramp, 1), 1.0)))


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageData, batch_size: int = 1000,
             channels_last: bool = False, amp: bool = False) -> tuple[float, torch.Tensor]:
    """Test accuracy in percent, and every test prediction (for exact comparisons)."""
    was_training = model.training
    model.eval()
    preds = []
    device = data.test_x.device
    use_amp = amp and device.type == "cuda"
    with torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else nullcontext():
        for xb, _ in batches(data, "test", batch_size, channels_last=channels_last):
            preds.append(model(xb).argmax(1))
    model.train(was_training)
    pred = torch.cat(preds)
    return 100.0 * float((pred == data.test_y).float().mean()), pred.cpu()


def _check_finite(step: int, loss: torch.Tensor, model: nn.Module, gamma: float) -> None:
    if torch.isfinite(loss):
        bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
        if not bad:
            return
        where = f"parameters {', '.join(bad[:4])}"
    else:
        where = "the loss"
    raise NumericalError(
        f"training diverged at step {step}: {where} became NaN or Inf (gamma={gamma:g}). "
        "The usual causes are a learning rate too high for the weights (trainer.lr) or for the "
        "bit depths and exponents (trainer.lr_quant), or a size-loss weight so large that "
        "every channel collapses (size_loss.gamma). Lower the one you last raised and rerun."
    )


class Trainer:
    """Holds the training state so that surgery can rebuild what depends on the model."""

    def __init__(self, model: nn.Module, data: ImageData, cfg: TrainConfig,
                 schedule: Callable[[int, int], float], learn_bits: bool, seed: int = 0) -> None:
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.cuda = self.device.type == "cuda"
        self.channels_last = cfg.channels_last
        self.data = data.to(self.device)
        self.model = model.to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.schedule = schedule
        self.learn_bits = learn_bits
        self.steps_per_epoch = max(len(data.train_x) // cfg.batch_size, 1)
        self.total_steps = cfg.max_epochs * self.steps_per_epoch
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.optimizer = make_optimizer(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, cfg.warmup))
        example = self.data.test_x[:1]
        self.graph = None
        if cfg.surgery != "off" and learn_bits:
            self.graph = surgery.trace(self.model, self.data.normalize(example))
        self.generator = torch.Generator().manual_seed(seed)  # batch order and augmentation
        self.step = 0
        self._refresh()

    def _refresh(self) -> None:
        """Recompute what depends on the model's shapes (after surgery)."""
        self.fixed_bits = size.fixed_bits(self.model).to(self.device)
        self.forward = self.model
        if self.cfg.compile:
            self.forward = torch.compile(self.model)

    def autocast(self):
        if self.cuda and self.cfg.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def prune(self, physical: bool) -> int:
        result = surgery.prune(self.model, self.graph, physical=physical, optimizer=self.optimizer)
        if result.total:
            self._refresh()
        return result.total

    def train_step(self, xb: torch.Tensor, yb: torch.Tensor, gamma: float):
        """One optimizer step; returns detached (loss, task loss, Q or None).

        Nothing returned holds the autograd graph: a graph kept alive across a surgery would
        pin the old parameter shapes in its gradient accumulators.
        """
        with self.autocast():
            task = F.cross_entropy(self.forward(xb), yb)
        loss, q = task, None
        if self.learn_bits:
            q = size.size_loss(self.model, self.fixed_bits)
            loss = task + gamma * q
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return loss.detach(), task.detach(), (q.detach() if q is not None else None)

    def metrics_row(self, epoch: float, train_loss: float, task_loss: float, q: float,
                    gamma: float) -> dict:
        acc, _ = evaluate(self.model, self.data, channels_last=self.channels_last, amp=self.cfg.amp)
        rep = size.report(self.model)
        row = {
            "step": self.step, "epoch": round(epoch, 4), "train_loss": train_loss,
            "task_loss": task_loss, "size_loss": q, "test_accuracy": acc,
            "bits_per_weight": rep.bits_per_weight, "float_bits_pct": rep.float_bits_pct,
            "weights_left_pct": rep.weights_left_pct, "gamma": gamma,
            "param_count": rep.param_count, "ideal_bytes": rep.ideal_bytes,
            "float32_bytes": rep.float32_bytes, "lr": self.optimizer.param_groups[0]["lr"],
        }
        row.update({f"channels/{k}": v[0] for k, v in rep.channels.items()})
        return row

    def run(self, on_eval: Callable[[dict], None] | None = None,
            on_steps: Callable[[list[dict]], None] | None = None) -> TrainResult:
        cfg = self.cfg
        result = TrainResult()
        eval_every = cfg.eval_every or self.steps_per_epoch
        start = time.perf_counter()
        other_time = 0.0  # evaluation and surgery: excluded from the step time
        steps_log: list[dict] = []
        bar = tqdm(total=self.total_steps, disable=not cfg.progress, dynamic_ncols=True,
                   mininterval=1.0)
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        task_sum = torch.zeros((), device=self.device)
        q_now = torch.zeros((), device=self.device)
        n_sum = 0
        gamma = self.schedule(0, self.total_steps)
        last_acc = float("nan")
        while self.step < self.total_steps:
            for xb, yb in batches(self.data, "train", cfg.batch_size, self.generator, self.channels_last):
                gamma = self.schedule(self.step, self.total_steps)
                loss, task, q = self.train_step(xb, yb, gamma)
                q_now = q if q is not None else q_now
                loss_sum += loss
                task_sum += task
                n_sum += 1
                steps_log.append({"step": self.step, "loss": loss, "task_loss": task,
                                  "size_loss": q_now, "gamma": gamma,
                                  "lr": self.optimizer.param_groups[0]["lr"]})
                if not self.cuda:
                    _check_finite(self.step, loss, self.model, gamma)

                if self.graph is not None and self.step % cfg.prune_every == 0:
                    t0 = time.perf_counter()
                    result.surgeries += bool(self.prune(physical=cfg.surgery == "physical"))
                    other_time += time.perf_counter() - t0
                if self.step % cfg.log_every == 0:
                    _check_finite(self.step, loss, self.model, gamma)  # a sync point anyway
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc=f"{last_acc:.2f}",
                                    bits=f"{float(q_now):.2f}", gamma=f"{gamma:.3g}")
                    bar.update(cfg.log_every)
                last = self.step >= self.total_steps
                if self.step % eval_every == 0 or last:
                    t0 = time.perf_counter()
                    if last and self.graph is not None:
                        # The run always ends physically shrunk: the reported size is the file's.
                        result.surgeries += bool(self.prune(physical=True))
                    _check_finite(self.step, loss, self.model, gamma)
                    row = self.metrics_row(self.step / self.steps_per_epoch, float(loss_sum / n_sum),
                                           float(task_sum / n_sum), float(q_now), gamma)
                    last_acc = row["test_accuracy"]
                    loss_sum.zero_()
                    task_sum.zero_()
                    n_sum = 0
                    result.history.append(row)
                    if on_steps:
                        on_steps([{k: float(v) for k, v in r.items()} for r in steps_log])
                    steps_log = []
                    if on_eval:
                        on_eval(row)
                    other_time += time.perf_counter() - t0
                if last:
                    break
        bar.close()
        result.wall_time_s = time.perf_counter() - start
        # Evaluation syncs the device, so wall time minus evaluation is honest on CUDA too.
        result.step_time_s = (result.wall_time_s - other_time) / max(self.step, 1)
        result.images_per_s = cfg.batch_size / result.step_time_s if self.step else 0.0
        result.final = dict(result.history[-1]) if result.history else {}
        return result


def learns_bits(model: nn.Module) -> bool:
    return any(layer.quantized and layer.b.requires_grad for _, layer in sc_layers(model))


def train(model: nn.Module, data: ImageData, cfg: TrainConfig,
          schedule: Callable[[int, int], float], seed: int = 0, **callbacks) -> TrainResult:
    """Train `model` (already converted by scn.quantize_) on `data`; see the module docstring."""
    return Trainer(model, data, cfg, schedule, learns_bits(model), seed).run(**callbacks)
