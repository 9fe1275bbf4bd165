"""The training loop: loss = task loss + gamma(t) * Q, with channel surgery every N steps.

Read top to bottom: pick the device, build the optimizer (weights and b/e in their own
groups), then for each batch compute the loss, step, and every `prune_every` steps remove
dead channels; every `eval_every` steps evaluate and hand a metrics row to `on_eval`;
every `checkpoint_every` steps hand the (finite) trainer to `on_checkpoint`, which scn.resume
can save and later restore exactly. The loop knows nothing about files: callers
(scn.experiment) decide where rows and checkpoints go.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from scn import config, size, surgery
from scn.data import ImageData, batches
from scn.errors import ConfigError, NumericalError
from scn.quant import frozen, quant_parameters, sc_layers, weight_parameters

SURGERY_MODES = ("physical", "masked", "off")


@dataclass
class TrainConfig:
    """How to train. Every field is a `trainer.` key on the command line."""

    max_epochs: int = 8
    max_steps: int = 0  # > 0 stops early (tests, smoke runs)
    batch_size: int = 128
    lr: float = 3e-3  # weights (AdamW), with warm-up and cosine decay
    lr_quant: float = 0.005  # b and e (Adam, no weight decay)
    weight_decay: float = 5e-4
    warmup: float = 0.03  # fraction of training spent warming the learning rate up
    eval_every: int = 0  # steps between test evaluations; 0 = once per epoch
    # Training batches that re-estimate BatchNorm statistics before each evaluation (and the
    # export); 0 = evaluate with the running averages (see recalibrate_norms for why not).
    recalibrate_bn: int = 20
    # Fraction of training, at its end, with the bit depths and exponents frozen (their lr 0):
    # the weights then fine-tune on a fixed bit allocation; 0 = learn them to the last step.
    freeze_quant: float = 0.0
    log_every: int = 25  # steps between progress-bar updates (a host-device sync on GPU)
    surgery: str = "physical"  # physical: remove dead channels; masked: only mask them; off
    prune_every: int = 200  # steps between surgeries; 0 = no surgery (as surgery=off)
    channel_multiple: int = 1  # physical surgery leaves channel counts at multiples of this
    checkpoint_every: int = 500  # steps between training checkpoints (resume); 0 = at the end only
    # > 0: this invocation trains at most this many steps, then writes a training checkpoint
    # and stops with status "paused"; resume=true goes on from it. For jobs with a time limit,
    # and for training several runs in turns (scripts/bench_removal.py). 0 = train to the end.
    pause_after_steps: int = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    amp: bool = True  # bf16 autocast on CUDA (CPU always runs float32)
    channels_last: bool = True
    compile: bool = False  # torch.compile the model (re-compiled after each surgery)
    progress: bool = True

    # Valid ranges and choices (a class attribute, not a field). scn.config checks them with
    # the field types here and, from the command line, before anything is built.
    LIMITS = {
        "max_epochs": config.POSITIVE, "max_steps": config.NON_NEGATIVE,
        "batch_size": config.POSITIVE, "lr": config.NON_NEGATIVE,
        "lr_quant": config.NON_NEGATIVE, "weight_decay": config.NON_NEGATIVE,
        "warmup": config.Range(0, 1, high_open=True), "eval_every": config.NON_NEGATIVE,
        "recalibrate_bn": config.NON_NEGATIVE, "freeze_quant": config.Range(0, 1, high_open=True),
        "log_every": config.POSITIVE, "surgery": SURGERY_MODES,
        "prune_every": config.NON_NEGATIVE, "checkpoint_every": config.NON_NEGATIVE,
        "channel_multiple": config.POSITIVE, "pause_after_steps": config.NON_NEGATIVE,
    }

    def __post_init__(self) -> None:
        config.validate(self, "trainer", self.LIMITS)
        pick_device(self.device)  # an unknown device, or CUDA where there is none, fails now


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # one row per evaluation
    final: dict = field(default_factory=dict)
    wall_time_s: float = 0.0
    step_time_s: float = 0.0  # mean training step, evaluation and surgery excluded
    images_per_s: float = 0.0
    surgeries: int = 0
    paused: bool = False  # stopped after trainer.pause_after_steps, before the last step


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise config.invalid("trainer.device", name, "auto, cpu, cuda or cuda:N (e.g. cuda:1)") from None
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


def freeze_step(total: int, freeze_quant: float) -> int:
    """The first step at which bit depths and exponents get learning rate 0 (`total` if never)."""
    return total - round(freeze_quant * total)


def lr_lambdas(optimizer: torch.optim.Optimizer, model: nn.Module, total: int,
               cfg: TrainConfig) -> list[Callable[[int], float]]:
    """One lr multiplier per parameter group: warm-up and cosine decay for every group, and
    zero for the bit depths and exponents over the last `cfg.freeze_quant` of training.

    Why freeze: at one or two bits a rounded b or e that flips moves a whole channel, so until
    the last step the accuracy jumps by a point or more between evaluations, and two runs that
    drift apart by round-off (masked and removal, say) end far apart by chance. With b and e
    still, the final stretch trains the weights on one bit allocation as the lr decays, as
    quantization-aware training usually ends (Nagel et al. 2022 freeze oscillating weights).
    """
    freeze_at = freeze_step(total, cfg.freeze_quant)

    def weights(step: int) -> float:
        return lr_factor(step, total, cfg.warmup)

    def quant(step: int) -> float:
        return weights(step) if step < freeze_at else 0.0

    quant_ids = {id(p) for p in quant_parameters(model)}
    return [quant if any(id(p) in quant_ids for p in g["params"]) else weights
            for g in optimizer.param_groups]


def bf16_autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when `amp`; a no-op elsewhere (the CPU always runs float32)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageData, batch_size: int = 1000,
             channels_last: bool = False, amp: bool = False) -> tuple[float, torch.Tensor]:
    """Test accuracy in percent, and every test prediction (for exact comparisons)."""
    was_training = model.training
    model.eval()
    preds = []
    with frozen(model), bf16_autocast(data.test_x.device, amp):
        for xb, _ in batches(data, "test", batch_size, channels_last=channels_last):
            preds.append(model(xb).argmax(1))
    model.train(was_training)
    pred = torch.cat(preds)
    return 100.0 * float((pred == data.test_y).float().mean()), pred.cpu()


def _norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_norms(model: nn.Module, data: ImageData, num_batches: int, batch_size: int = 256,
                      channels_last: bool = False, amp: bool = False, seed: int = 0) -> int:
    """Replace every BatchNorm's running statistics by their average over `num_batches`.

    The running averages trail the weights by ~1/momentum steps. A self-compressing network
    changes in jumps: whenever a rounded exponent or bit depth crosses a half-integer, a
    channel's scale or grid changes at once (and with a BatchNorm after the convolution the
    loss hardly depends on a channel's scale, so little holds e in place). Training, on batch
    statistics, does not mind; an eval-mode network with averages over the last few networks
    does: at gamma=0.5, lr_quant=0.01 on Fashion-MNIST, steps 819-1521, we measured 42.9-78.9%
    test accuracy with the running averages where the same weights gave 83.5-89.9% with fresh
    statistics (docs/results/bn_statistics_probe.jsonl, scripts/probe_bn_statistics.py).
    Nagel et al. 2022 ("Overcoming oscillations in quantization-aware training") re-estimate
    them for the same reason. The batches come from a generator of their own (`seed`), so the
    run's batch order is untouched and a resumed run recalibrates identically.
    Returns the number of BatchNorm layers recalibrated.
    """
    norms = _norms(model)
    if not norms or num_batches <= 0:
        return 0
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    model.train()
    generator = torch.Generator().manual_seed(seed)
    try:
        with frozen(model), bf16_autocast(data.train_x.device, amp):
            for xb, _ in itertools.islice(batches(data, "train", batch_size, generator, channels_last),
                                          num_batches):
                model(xb)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return len(norms)


def _check_finite(step: int, loss: torch.Tensor, model: nn.Module, gamma: float) -> None:
    """Stop with a NumericalError naming the step when the loss or a parameter is NaN or Inf.

    Parameters include every layer's bit depths b and exponents e, so a diverging b/e learning
    rate is caught as early as one of the weights.
    """
    if torch.isfinite(loss):
        bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
        if not bad:
            return
        where = f"parameters {', '.join(bad[:4])}" + (" and more" if len(bad) > 4 else "")
        if all(n.endswith((".b", ".e")) for n in bad):
            where += " (bit depths b / exponents e: most likely trainer.lr_quant is too high)"
    else:
        where = "the loss"
    raise NumericalError(
        f"training diverged at step {step}: {where} became NaN or Inf (gamma={gamma:g}). "
        "The usual causes are a learning rate too high for the weights (trainer.lr) or for the "
        "bit depths and exponents (trainer.lr_quant), or a size-loss weight so large that "
        "every channel collapses (size_loss.gamma). Lower the one you last raised and rerun."
    )


class Window:
    """The loss sums since the last evaluation, which a metrics row averages.

    Device tensors, so adding to them never waits for the device.
    """

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
    """Holds the training state so that surgery can rebuild what depends on the model.

    Everything the loop carries from one step to the next lives on the trainer (not in local
    variables), so that scn.resume can write it to a training checkpoint and put it back: a
    resumed run then takes exactly the steps the uninterrupted run would have taken.
    """

    def __init__(self, model: nn.Module, data: ImageData, cfg: TrainConfig,
                 schedule: Callable[[int, int], float], learn_bits: bool, seed: int = 0) -> None:
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.cuda = self.device.type == "cuda"
        scheme = getattr(model, "scn_scheme", None)
        uses_diffq = scheme is not None and scheme.kind == "diffq"
        # DiffQ views its parameters as flat groups, which a channels-last weight cannot do.
        self.channels_last = cfg.channels_last and not uses_diffq
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
        self.diffq = None  # the DiffQ baseline attaches to the optimizer, before the scheduler
        if uses_diffq:
            from scn.diffq_baseline import DiffQ

            self.diffq = DiffQ(self.model, self.optimizer, scheme.group_size, scheme.init_bits)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambdas(self.optimizer, self.model, self.total_steps, cfg))
        example = self.data.test_x[:1]
        self.graph = None
        if cfg.surgery != "off" and cfg.prune_every and learn_bits:
            self.graph = surgery.trace(self.model, self.data.normalize(example))
        self.generator = torch.Generator().manual_seed(seed)  # batch order and augmentation
        self.step = 0
        self.epoch_rng = self.generator.get_state()  # the generator as the current epoch began
        self.epoch_batches = 0  # batches of the current epoch already trained on
        self.window = Window(self.device)
        self.q_now = torch.zeros((), device=self.device)  # the latest size term Q
        self.pending: list[dict] = []  # train-log rows not yet handed to on_steps
        self.result = TrainResult()
        self.elapsed_s = 0.0  # wall time spent on this run so far (by earlier processes too)
        self.other_s = 0.0  # of which evaluation and surgery: excluded from the step time
        self._refresh()

    def _refresh(self) -> None:
        """Recompute what depends on the model's shapes (after surgery)."""
        if self.channels_last:  # sliced tensors come back in NCHW: restore the fast layout
            self.model.to(memory_format=torch.channels_last)
        self.fixed_bits = size.fixed_bits(self.model).to(self.device)
        self.forward = self.model
        if self.cfg.compile:
            self.forward = torch.compile(self.model)

    def prune(self, physical: bool) -> int:
        surgery.settle_norms(self.model, self.graph)  # fold what training saw, not stale stats
        result = surgery.prune(self.model, self.graph, physical=physical, optimizer=self.optimizer,
                               multiple=self.cfg.channel_multiple)
        if result.total:
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
        with bf16_autocast(self.device, self.cfg.amp):
            task = F.cross_entropy(self.forward(xb), yb)
        loss, q = task, None
        if self.learn_bits:
            q = size.size_loss(self.model, self.fixed_bits)
            loss = task + gamma * q
        elif self.diffq is not None:
            q = self.diffq.size_term()  # megabytes, DiffQ's own penalty
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
        rep = self.diffq.report() if self.diffq is not None else size.report(self.model)
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

    def _evaluate(self, gamma: float, last: bool, on_eval, on_steps) -> dict:
        """A metrics row (after the final surgery when `last`); hands the rows out."""
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
        if on_steps:
            on_steps([{k: float(v) for k, v in r.items()} for r in self.pending])
        self.pending = []
        if on_eval:
            on_eval(row)
        return row

    def run(self, on_eval: Callable[[dict], None] | None = None,
            on_steps: Callable[[list[dict]], None] | None = None,
            on_checkpoint: Callable[[Trainer], None] | None = None) -> TrainResult:
        """Train to the end from wherever the trainer stands (step 0, or a restored state).

        on_eval gets each metrics row, on_steps the train-log rows since the last evaluation,
        on_checkpoint the trainer every `checkpoint_every` steps and at the end, its state
        checked to be finite first (a diverged state must never replace a good checkpoint).
        With `pause_after_steps`, it returns after that many steps (result.paused, a checkpoint
        handed out first); wall_time_s then counts the training done so far, by every process.
        """
        cfg = self.cfg
        result = self.result
        eval_every = cfg.eval_every or self.steps_per_epoch
        pause_at = self.step + cfg.pause_after_steps if cfg.pause_after_steps else self.total_steps
        start = time.perf_counter() - self.elapsed_s
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not cfg.progress,
                   dynamic_ncols=True, mininterval=1.0)
        self.model.train()
        last_acc = result.history[-1]["test_accuracy"] if result.history else float("nan")
        while self.step < self.total_steps:
            for xb, yb in self._epoch():
                gamma = self.schedule(self.step, self.total_steps)
                loss, task, q = self.train_step(xb, yb, gamma)
                self.q_now = q if q is not None else self.q_now
                self.window.add(loss, task)
                self.pending.append({"step": self.step, "loss": loss, "task_loss": task,
                                     "size_loss": self.q_now, "gamma": gamma,
                                     "lr": self.optimizer.param_groups[0]["lr"]})
                if not self.cuda:
                    _check_finite(self.step, loss, self.model, gamma)

                if self.graph is not None and self.step % cfg.prune_every == 0:
                    t0 = time.perf_counter()
                    result.surgeries += bool(self.prune(physical=cfg.surgery == "physical"))
                    self.other_s += time.perf_counter() - t0
                if self.step % cfg.log_every == 0:
                    _check_finite(self.step, loss, self.model, gamma)  # a sync point anyway
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc=f"{last_acc:.2f}",
                                    bits=f"{float(self.q_now):.2f}", gamma=f"{gamma:.3g}")
                    bar.update(cfg.log_every)
                last = self.step >= self.total_steps
                result.paused = not last and self.step >= pause_at
                if self.step % eval_every == 0 or last:
                    t0 = time.perf_counter()
                    _check_finite(self.step, loss, self.model, gamma)
                    last_acc = self._evaluate(gamma, last, on_eval, on_steps)["test_accuracy"]
                    self.other_s += time.perf_counter() - t0
                every = cfg.checkpoint_every
                if on_checkpoint and (last or result.paused or (every and self.step % every == 0)):
                    t0 = time.perf_counter()
                    _check_finite(self.step, loss, self.model, gamma)
                    self.elapsed_s = t0 - start
                    on_checkpoint(self)
                    self.other_s += time.perf_counter() - t0
                if last or result.paused:
                    break
            if result.paused:
                break
        bar.close()
        result.wall_time_s = time.perf_counter() - start
        # Evaluation syncs the device, so wall time minus evaluation is honest on CUDA too.
        result.step_time_s = (result.wall_time_s - self.other_s) / max(self.step, 1)
        result.images_per_s = cfg.batch_size / result.step_time_s if self.step else 0.0
        result.final = dict(result.history[-1]) if result.history else {}
        return result


def learns_bits(model: nn.Module) -> bool:
    return any(layer.quantized and layer.b.requires_grad for _, layer in sc_layers(model))


def train(model: nn.Module, data: ImageData, cfg: TrainConfig,
          schedule: Callable[[int, int], float], seed: int = 0, **callbacks) -> TrainResult:
    """Train `model` (already converted by scn.quantize_) on `data`; see the module docstring."""
    return Trainer(model, data, cfg, schedule, learns_bits(model), seed).run(**callbacks)
