"""The training loop: loss = task loss + gamma(t) * Q, with channel surgery every N steps.

`Trainer.run` reads top to bottom as its named steps: train step, surgery, progress, evaluation,
checkpoint, pause. It reports to a `Reporter` (scn.run_folder writes a run folder) and knows no
files. All the loop carries between steps lives on the trainer, in `state_dict()`, so scn.resume
can serialise it and a resumed run takes exactly the uninterrupted run's steps.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from scn import distributed, optim, surgery
from scn.data import ImageData, batches
from scn.errors import ConfigError
from scn.evaluation import bf16_autocast, evaluate, recalibrate_norms
from scn.numerics import check_finite
from scn.quant import refit_exponents, sc_layers
from scn.train_config import SURGERY_MODES, TrainConfig, pick_device  # noqa: F401 (re-exported)


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # one row per evaluation
    final: dict = field(default_factory=dict)
    wall_time_s: float = 0.0
    step_time_s: float = 0.0  # mean training step, evaluation, surgery and compilation excluded
    compile_time_s: float = 0.0  # trainer.compile: the first step after each (re)compilation
    images_per_s: float = 0.0
    surgeries: int = 0
    paused: bool = False  # stopped after trainer.pause_after_steps, before the last step


class Reporter:
    """What a training run reports to; every hook does nothing unless overridden."""

    wants_checkpoints = False  # whether `checkpoint` should be called at all

    def evaluated(self, row: dict) -> None:
        """A metrics row, after each evaluation."""

    def logged(self, rows: list[dict]) -> None:
        """The train-log rows (one per step) since the last evaluation."""

    def checkpoint(self, trainer: Trainer) -> None:
        """The trainer every `checkpoint_every` steps, at a pause and at the end, checked finite."""


class Window:
    """The loss sums since the last evaluation (device tensors: adding never waits for them)."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.task = torch.zeros((), device=device)
        self.n = 0

    def add(self, loss: torch.Tensor, task: torch.Tensor) -> None:
        self.loss += loss
        self.task += task
        self.n += 1

    def reset(self) -> None:
        self.loss.zero_()
        self.task.zero_()
        self.n = 0


class Trainer:
    """Holds the training state so that surgery can rebuild what depends on the model."""

    def __init__(self, model: nn.Module, data: ImageData, cfg: TrainConfig,
                 schedule: Callable[[int, int], float], learn_bits: bool, seed: int = 0) -> None:
        self.cfg = cfg
        self.dist = distributed.current()  # None: one process
        distributed.check_batch(cfg.batch_size)
        self.device = pick_device(cfg.device)
        self.cuda = self.device.type == "cuda"
        method = model.scn_scheme  # the scn.methods config class quantize_ converted it with
        self.channels_last = cfg.channels_last and method.channels_last
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
        self.optimizer = optim.make_optimizer(self.model, cfg)
        # The size term; a plugin method may add its own parameter group, before the scheduler.
        self.size = method.attach(self.model, self.optimizer)
        self.size.fuse = not cfg.compile
        self.scheduler = optim.scheduler(self.optimizer, self.model, self.total_steps, cfg)
        self.graph = None
        if cfg.does_surgery and learn_bits:
            self.graph = surgery.trace(self.model, self.data.normalize(self.data.test_x[:1]))
        self.surgery_at = (optim.freeze_step(self.total_steps, cfg.freeze_quant)
                           if cfg.prune_every == "freeze" else None)
        self.generator = torch.Generator().manual_seed(seed)  # batch order and augmentation
        self.step = 0
        self.epoch_rng = self.generator.get_state()  # the generator as the current epoch began
        self.epoch_batches = 0  # batches of the current epoch already trained on
        self.window = Window(self.device)
        self.q_now = torch.zeros((), device=self.device)  # the latest size term Q
        self.pending: list[dict] = []  # train-log rows not yet reported
        self.result = TrainResult()
        self.elapsed_s = 0.0  # wall time spent on this run so far (by earlier processes too)
        self.other_s = 0.0  # of which evaluation and surgery: excluded from the step time
        self.forward_compiled = False
        self.shrunk_to_target = False  # stop_shrinking_at reached: gamma 0 (and b held) from then on
        self._refresh()

    # ---------------------------------------------------------------------------- the loop

    def run(self, reporter: Reporter | None = None) -> TrainResult:
        """Train to the end from wherever the trainer stands (step 0, or a restored state).

        With `pause_after_steps`, it returns after that many steps (result.paused, a checkpoint
        reported first); wall_time_s then counts the training done so far, by every process.
        """
        reporter = reporter or Reporter()
        pause_at = self.step + self.cfg.pause_after_steps if self.cfg.pause_after_steps else None
        start = time.perf_counter() - self.elapsed_s
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.cfg.progress,
                   dynamic_ncols=True, mininterval=1.0)
        self.model.train()
        while self.step < self.total_steps and not self.result.paused:
            for xb, yb in self._epoch():
                gamma = 0.0 if self.shrunk_to_target else self.schedule(self.step, self.total_steps)
                loss = self._train_step(xb, yb, gamma)
                self._surgery_if_due()
                self._progress_if_due(bar, loss, gamma)
                last = self.step >= self.total_steps
                self.result.paused = not last and pause_at is not None and self.step >= pause_at
                self._evaluate_if_due(gamma, last, loss, reporter)
                self._checkpoint_if_due(last, loss, gamma, start, reporter)
                if last or self.result.paused:
                    break
        bar.close()
        return self._finish(start)

    def _train_step(self, xb: torch.Tensor, yb: torch.Tensor, gamma: float) -> torch.Tensor:
        t0 = time.perf_counter() if self.compile_due else 0.0
        loss, task, q = self.train_step(xb, yb, gamma)
        if self.compile_due:  # torch.compile compiles on its first call: time it on its own
            if self.cuda:
                torch.cuda.synchronize(self.device)
            self.compile_due = False
            self.result.compile_time_s += time.perf_counter() - t0
            self.other_s += time.perf_counter() - t0
        self.q_now = q if q is not None else self.q_now
        self.window.add(loss, task)
        self.pending.append({"step": self.step, "loss": loss, "task_loss": task, "size_loss": self.q_now,
                             "gamma": gamma, "lr": self.optimizer.param_groups[0]["lr"]})
        if not self.cuda:  # on CUDA the check waits for the log step: it syncs the device
            check_finite(self.step, loss, self.model, gamma)
        return loss

    def _surgery_if_due(self) -> None:
        due = (self.step == self.surgery_at if self.surgery_at is not None
               else self.graph is not None and self.step % self.cfg.prune_every == 0)
        if self.graph is not None and due:
            t0 = time.perf_counter()
            self.result.surgeries += bool(self.prune(physical=self.cfg.surgery == "physical"))
            self.other_s += time.perf_counter() - t0

    def _progress_if_due(self, bar, loss: torch.Tensor, gamma: float) -> None:
        if self.step % self.cfg.log_every == 0:
            check_finite(self.step, loss, self.model, gamma)  # a sync point anyway
            acc = self.result.history[-1]["test_accuracy"] if self.result.history else float("nan")
            bar.set_postfix(loss=f"{float(loss):.3f}", acc=f"{acc:.2f}",
                            bits=f"{float(self.q_now):.2f}", gamma=f"{gamma:.3g}")
            bar.update(self.cfg.log_every)

    def _evaluate_if_due(self, gamma: float, last: bool, loss: torch.Tensor, reporter: Reporter) -> None:
        if self.step % (self.cfg.eval_every or self.steps_per_epoch) == 0 or last:
            t0 = time.perf_counter()
            check_finite(self.step, loss, self.model, gamma)
            self._evaluate(gamma, last, reporter)
            self.other_s += time.perf_counter() - t0

    def _checkpoint_if_due(self, last: bool, loss: torch.Tensor, gamma: float, start: float,
                           reporter: Reporter) -> None:
        every = self.cfg.checkpoint_every
        due = last or self.result.paused or (every and self.step % every == 0)
        if reporter.wants_checkpoints and due:
            t0 = time.perf_counter()
            check_finite(self.step, loss, self.model, gamma)  # never replace a good checkpoint
            self.elapsed_s = t0 - start
            reporter.checkpoint(self)
            self.other_s += time.perf_counter() - t0

    def _finish(self, start: float) -> TrainResult:
        result = self.result
        result.wall_time_s = time.perf_counter() - start
        # Evaluation syncs the device, so wall time minus evaluation is honest on CUDA too.
        result.step_time_s = (result.wall_time_s - self.other_s) / max(self.step, 1)
        result.images_per_s = self.cfg.batch_size / result.step_time_s if self.step else 0.0
        result.final = dict(result.history[-1]) if result.history else {}
        return result

    # ---------------------------------------------------------------------------- its steps

    def _refresh(self) -> None:
        """Recompute what depends on the model's shapes (after surgery)."""
        if self.channels_last:  # sliced tensors come back in NCHW: restore the fast layout
            self.model.to(memory_format=torch.channels_last)
        self.size.refresh(self.device, self.graph)
        budget = self.cfg.stop_shrinking_at  # a function of the model: a resumed run agrees
        if budget and not self.shrunk_to_target and self.size.report().weights_left_pct <= budget:
            self.shrunk_to_target = True  # weights never grow back: checked until reached
            optim.settle_at_budget(self.optimizer, self.model, self.cfg.budget_bits)
        # Under torchrun, DDP around the model as it now is: a surgery changed its parameters.
        if self.dist and self.cfg.sync_norms:
            distributed.convert_norms(self.model)
        self.forward = distributed.wrap(self.model, self.device) if self.dist else self.model
        self.compile_due = self.cfg.compile
        if self.cfg.compile:  # new shapes: compile again (the reference quantizer, which it fuses)
            if self.forward_compiled:
                torch.compiler.reset()  # or dynamo's recompile limit would fall back to eager
            self.forward = torch.compile(self.forward)
            self.forward_compiled = True

    def prune(self, physical: bool) -> int:
        if self.dist:  # every rank must cut the same channels: the same b, the same statistics
            distributed.sync_buffers(self.model)
            distributed.check_same("bit depths", torch.cat([layer.int_bits().float() for _, layer
                                                            in sc_layers(self.model)]))
            # DDP holds the parameters' gradient accumulators, shapes included: let it go first.
            self.forward = self.model
            gc.collect()
        surgery.settle_norms(self.model, self.graph)  # fold what training saw, not stale stats
        refit_exponents(self.model)  # when the method asks for it (quant.exponent_refit)
        result = surgery.prune(self.model, self.graph, physical=physical, optimizer=self.optimizer,
                               multiple=self.cfg.channel_multiple)
        if result.total or self.dist:
            self._refresh()
        return result.total

    def _epoch(self):
        """The current epoch's batches from where it stands.

        An epoch's order and augmentation are drawn from the generator as the epoch began, so a
        resumed run restores that state, draws the batches already trained on again and
        discards them (cheap next to training on them), and goes on with exactly the next one.
        """
        if self.epoch_batches == 0:
            self.epoch_rng = self.generator.get_state()
        else:
            self.generator.set_state(self.epoch_rng)
        it = batches(self.data, "train", self.cfg.batch_size, self.generator, self.channels_last)
        for _ in range(self.epoch_batches):
            next(it)
        for batch in it:
            self.epoch_batches += 1
            yield batch
        self.epoch_batches = 0

    def train_step(self, xb: torch.Tensor, yb: torch.Tensor, gamma: float):
        """One optimizer step; returns detached (loss, task loss, Q or None).

        Nothing returned holds the autograd graph: a graph kept alive across a surgery would
        pin the old parameter shapes in its gradient accumulators.
        """
        q = self.size.term()  # first: it may quantize the weights the forward pass uses
        if self.dist:  # this rank's slice of the global batch; DDP averages the gradients
            xb, yb = distributed.shard(xb), distributed.shard(yb)
        with bf16_autocast(self.device, self.cfg.amp), distributed.synced_norms(self.cfg.sync_norms):
            task = F.cross_entropy(self.forward(xb), yb)
        loss = task if q is None else task + gamma * q
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.shrunk_to_target and self.cfg.hold_bits:  # b held at the budget: no step for it
            optim.drop_bit_grads(self.model)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        if self.dist:  # the global batch's losses, as one process computes them
            loss, task = distributed.mean(loss), distributed.mean(task)
        return loss.detach(), task.detach(), (q.detach() if q is not None else None)

    def metrics_row(self, epoch: float, train_loss: float, task_loss: float, q: float,
                    gamma: float) -> dict:
        acc, _ = evaluate(self.model, self.data, channels_last=self.channels_last, amp=self.cfg.amp)
        rep = self.size.report()
        row = {
            "step": self.step, "epoch": round(epoch, 4), "train_loss": train_loss,
            "task_loss": task_loss, "size_loss": q, "test_accuracy": acc,
            "bits_per_weight": rep.bits_per_weight, "float_bits_pct": rep.float_bits_pct,
            "weights_left_pct": rep.weights_left_pct, "gamma": gamma,
            "param_count": rep.param_count, "ideal_bytes": rep.ideal_bytes,
            "float32_bytes": rep.float32_bytes, "lr": self.optimizer.param_groups[0]["lr"],
        }
        row.update({f"channels/{k}": v[0] for k, v in rep.channels.items()})
        row.update(self.size.row())
        return row

    def _evaluate(self, gamma: float, last: bool, reporter: Reporter) -> dict:
        """A metrics row (after the final surgery when `last`); reports the rows."""
        if self.dist:
            distributed.sync_buffers(self.model)  # every rank evaluates rank 0's network
        if self.cfg.recalibrate_bn:
            recalibrate_norms(self.model, self.data, self.cfg.recalibrate_bn,
                              channels_last=self.channels_last, amp=self.cfg.amp, seed=self.step)
        if last and self.graph is not None:
            # The run always ends physically shrunk: the reported size is the file's.
            self.result.surgeries += bool(self.prune(physical=True))
        elif self.graph is not None:
            surgery.settle_norms(self.model, self.graph)  # channels dead since the last surgery
        w = self.window
        row = self.metrics_row(self.step / self.steps_per_epoch, float(w.loss / w.n),
                               float(w.task / w.n), float(self.q_now), gamma)
        w.reset()
        self.result.history.append(row)
        reporter.logged([{k: float(v) for k, v in r.items()} for r in self.pending])
        self.pending = []
        reporter.evaluated(row)
        return row

    # ---------------------------------------------------------------------------- its state

    def state_dict(self) -> dict:
        """Everything a resumed run needs: {"tensors": {name: tensor}, "meta": JSON values}.

        Tensors: model/<key>, optim/<parameter name>/<slot> (AdamW's state keyed by name, so it
        maps onto the rebuilt, shrunk model), rng/torch, rng/cuda/<i>, rng/data_epoch (the data
        generator as the epoch began), window/loss, window/task, window/q. The gamma and lr
        schedules are functions of the step, so the step restores them.
        """
        if hasattr(self.optimizer, "sync_steps"):
            self.optimizer.sync_steps()  # scn.optim.AdamW keeps shared step counts on the host
        names = {id(p): n for n, p in self.model.named_parameters()}
        tensors = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        for p, slots in self.optimizer.state.items():
            tensors.update({f"optim/{names[id(p)]}/{k}": v for k, v in slots.items()})
        tensors["rng/torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            tensors.update({f"rng/cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        tensors.update({"rng/data_epoch": self.epoch_rng, "window/loss": self.window.loss,
                        "window/task": self.window.task, "window/q": self.q_now})
        meta = {
            "step": self.step, "total_steps": self.total_steps,
            "epoch_batches": self.epoch_batches, "window_n": self.window.n,
            "lrs": [g["lr"] for g in self.optimizer.param_groups],
            "scheduler": {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"},
            "pending": [{k: float(v) for k, v in row.items()} for row in self.pending],
            "history": self.result.history, "surgeries": self.result.surgeries,
            "elapsed_s": self.elapsed_s, "other_s": self.other_s, "compile_s": self.result.compile_time_s,
        }
        return {"tensors": {k: v.detach() for k, v in tensors.items()}, "meta": meta}

    def load_state_dict(self, state: dict) -> None:
        """Put a `state_dict()` back; the trainer must be built around its model, same config.

        Tensors keep the memory layout they come with (scn.resume restores the saved one).
        """
        meta, t = state["meta"], state["tensors"]
        if meta["total_steps"] != self.total_steps:
            raise ConfigError(f"the training state is of a run of {meta['total_steps']} steps, "
                              f"this one has {self.total_steps}; it cannot continue it.")
        for key, tensor in self.model.state_dict(keep_vars=True).items():
            tensor.data = t[f"model/{key}"].to(tensor.device)
        optim.load_state(self.optimizer, self.model, t)
        for group, lr in zip(self.optimizer.param_groups, meta["lrs"], strict=True):
            group["lr"] = lr
        groups = len(self.optimizer.param_groups)
        self.scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * groups})
        torch.set_rng_state(t["rng/torch"])
        cuda = [t[f"rng/cuda/{i}"] for i in range(torch.cuda.device_count()) if f"rng/cuda/{i}" in t]
        if cuda and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        self.epoch_rng = t["rng/data_epoch"]
        self.generator.set_state(self.epoch_rng)
        self.epoch_batches = int(meta["epoch_batches"])
        self.window.loss, self.window.task, self.q_now = (t[f"window/{k}"].to(self.device)
                                                          for k in ("loss", "task", "q"))
        self.window.n, self.step = int(meta["window_n"]), int(meta["step"])
        self.pending, self.result.history = list(meta["pending"]), list(meta["history"])
        self.result.surgeries = int(meta["surgeries"])
        self.elapsed_s, self.other_s = float(meta["elapsed_s"]), float(meta["other_s"])
        self.result.compile_time_s = float(meta.get("compile_s", 0.0))


def learns_bits(model: nn.Module) -> bool:
    return any(layer.quantized and layer.b.requires_grad for _, layer in sc_layers(model))


def train(model: nn.Module, data: ImageData, cfg: TrainConfig, schedule: Callable[[int, int], float],
          seed: int = 0, reporter: Reporter | None = None) -> TrainResult:
    """Train `model` (already converted by scn.quantize_) on `data`; see the module docstring."""
    return Trainer(model, data, cfg, schedule, learns_bits(model), seed).run(reporter)
