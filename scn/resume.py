"""Training checkpoints: everything a killed run needs to go on exactly where it stopped.

`<run folder>/checkpoint/train_state.safetensors`, written every `trainer.checkpoint_every`
steps and at the end, atomically (scn.io: the previous file stays until the new one is
complete). No pickle: tensors are safetensors entries, everything else is JSON in the
metadata entry "scn".

Tensors:
    model/<key>              the model's state at its current shapes (channels removed by
                             surgery stay removed)
    optim/<param>/<key>      AdamW's state (exp_avg, exp_avg_sq, step) keyed by parameter
                             *name*, so it maps onto the rebuilt, shrunk model
    rng/torch, rng/cuda/<i>  torch's global generators
    rng/data_epoch           the data generator as the current epoch began
    window/loss, window/task, window/q   loss sums since the last evaluation; the latest Q
JSON header:
    format, version; model (checkpoint.describe: model, scheme, size reference, dataset);
    step, total_steps, epoch_batches (batches of the current epoch already used), window_n;
    lrs (each optimizer group's lr) and scheduler (LambdaLR's state); strides (tensors kept in
    a non-default memory layout, e.g. channels_last); pending (train-log rows not yet handed
    out), history (metrics rows), surgeries, elapsed_s, other_s; and what the caller adds
    (scn.experiment: config_hash, config, and the run folder's CSV rows so far).

The gamma schedule and the learning-rate schedule are functions of the step, so the step
restores them. Restoring: `load` reads the file, `build_model` rebuilds the model at its
stored shapes (checkpoint.rebuild), and after a Trainer is built around that model (which
re-traces its channel graph), `restore` puts the optimizer, schedules, generators and the
loop's position back.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open
from safetensors.torch import save as st_save
from torch import nn

from scn import checkpoint, io
from scn.errors import FormatError, NumericalError

if TYPE_CHECKING:
    from scn.train import Trainer

FORMAT = "scn-train-state"
VERSION = 1
RELATIVE_PATH = Path("checkpoint") / "train_state.safetensors"


def path_in(run_dir: str | Path) -> Path:
    return Path(run_dir) / RELATIVE_PATH


@dataclass
class State:
    """A training checkpoint as read back: its tensors (on the CPU) and its JSON header."""

    tensors: dict[str, torch.Tensor]
    meta: dict

    @property
    def step(self) -> int:
        return int(self.meta["step"])


# ---------------------------------------------------------------------------------------------
# Writing


def capture(trainer: Trainer, dataset: dict | None = None, **info) -> State:
    """The trainer's complete state as CPU copies; `info` goes into the header as it is."""
    model, opt = trainer.model, trainer.optimizer
    live = {f"model/{k}": v for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, state in opt.state.items():
        for key, value in state.items():
            live[f"optim/{names[id(p)]}/{key}"] = value
    live["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        live.update({f"rng/cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    live["rng/data_epoch"] = trainer.epoch_rng
    live.update({"window/loss": trainer.window.loss, "window/task": trainer.window.task,
                 "window/q": trainer.q_now})
    strides = {k: list(v.stride()) for k, v in live.items() if v.stride() != _default_strides(v.shape)}
    tensors = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
               for k, v in live.items()}
    meta = {
        "format": FORMAT, "version": VERSION,
        "model": checkpoint.describe(model, dataset),
        "step": trainer.step, "total_steps": trainer.total_steps,
        "epoch_batches": trainer.epoch_batches, "window_n": trainer.window.n,
        "lrs": [g["lr"] for g in opt.param_groups],
        "scheduler": {k: v for k, v in trainer.scheduler.state_dict().items() if k != "lr_lambdas"},
        "strides": strides,
        "pending": [{k: float(v) for k, v in row.items()} for row in trainer.pending],
        "history": trainer.result.history, "surgeries": trainer.result.surgeries,
        "elapsed_s": trainer.elapsed_s, "other_s": trainer.other_s,
        **info,
    }
    return State(tensors, meta)


def _default_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, n = [], 1
    for size in reversed(shape):
        strides.append(n)
        n *= max(size, 1)
    return tuple(reversed(strides))


def check_finite(state: State) -> None:
    """A NumericalError unless every float tensor of the state is finite.

    The loop checks the loss and the parameters before each checkpoint; this also covers the
    optimizer's moments and BatchNorm's statistics, so no diverged state can replace a good file.
    """
    bad = [k for k, v in state.tensors.items()
           if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise NumericalError(
            f"training diverged at step {state.step}: {', '.join(bad[:4])} became NaN or Inf, so "
            "this state was not saved and the last good training checkpoint stays. Lower the "
            "learning rates (trainer.lr, trainer.lr_quant) or size_loss.gamma and rerun.")


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' names and bytes: catches a checkpoint damaged on disk."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save(path: str | Path, state: State) -> None:
    """Write `state` atomically (after checking it is finite)."""
    check_finite(state)
    meta = {"scn": json.dumps({**state.meta, "tensors_sha256": digest(state.tensors)}, default=_plain)}
    # Serialized in memory and written by Python: a full disk is then an OSError naming the
    # file, where safetensors' own writer raises a SafetensorError without one.
    io.write_bytes(path, st_save(state.tensors, metadata=meta))


def _plain(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"cannot write {type(x).__name__} into a training checkpoint")


# ---------------------------------------------------------------------------------------------
# Reading and restoring


def load(path: str | Path) -> State:
    """Read a training checkpoint; a FormatError says what is wrong with a bad one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("scn")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _unreadable(path, str(exc)) from None
    try:
        meta = json.loads(raw)
        if not isinstance(meta, dict):
            raise ValueError("the header is not a JSON object")
    except (TypeError, ValueError, RecursionError) as exc:
        raise _unreadable(path, f"no valid 'scn' header: {exc}") from None
    if meta.get("format") != FORMAT:
        raise _unreadable(path, f"it is a {meta.get('format')!r} file, not {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise FormatError(f"{path} is version {meta.get('version')!r} of the training checkpoint; "
                          f"this scn reads version {VERSION}. Resume it with the scn that wrote it, "
                          "or run the same command without resume=true to start over.")
    try:
        intact = meta.get("tensors_sha256") == digest(tensors)
    except (RuntimeError, TypeError) as exc:
        raise _unreadable(path, str(exc)) from None
    if not intact:
        raise _unreadable(path, "its tensors do not match their SHA-256 checksum: a damaged file")
    return State(tensors, meta)


def _unreadable(path: str | Path, why: str) -> FormatError:
    return FormatError(f"{path} is not a readable training checkpoint ({why}). To start the "
                       "run over, run the same command without resume=true (which replaces it).")


def build_model(state: State) -> nn.Module:
    """The model of the checkpoint, at its stored shapes and with its stored values."""
    values = {k.removeprefix("model/"): v for k, v in state.tensors.items() if k.startswith("model/")}
    stored = sum(v.numel() * v.element_size() for v in state.tensors.values())
    model = checkpoint.rebuild(state.meta["model"], {k: tuple(v.shape) for k, v in values.items()},
                               max_scalars=max(1 << 24, 1024 * stored))
    try:
        model.load_state_dict(values, strict=True)
    except RuntimeError as exc:
        raise FormatError(f"the training checkpoint does not fit the model it names ({exc}).") from None
    return model


def restore(trainer: Trainer, state: State) -> None:
    """Put the optimizer, schedules, generators and loop position of `state` back.

    `trainer` must be built around `build_model(state)`, with the same config.
    """
    meta, t = state.meta, state.tensors
    if meta["total_steps"] != trainer.total_steps:
        raise FormatError(f"the training checkpoint is of a run of {meta['total_steps']} steps, "
                          f"this one has {trainer.total_steps}; it cannot continue it.")
    strides = meta.get("strides", {})
    for key, tensor in trainer.model.state_dict(keep_vars=True).items():
        tensor.data = _laid_out(tensor.data, strides.get(f"model/{key}"))
    _restore_optimizer(trainer, t, strides)
    for group, lr in zip(trainer.optimizer.param_groups, meta["lrs"], strict=True):
        group["lr"] = lr
    groups = len(trainer.optimizer.param_groups)
    trainer.scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * groups})
    torch.set_rng_state(t["rng/torch"])
    cuda = [t[f"rng/cuda/{i}"] for i in range(torch.cuda.device_count()) if f"rng/cuda/{i}" in t]
    if cuda and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    trainer.epoch_rng = t["rng/data_epoch"]
    trainer.generator.set_state(trainer.epoch_rng)
    trainer.epoch_batches = int(meta["epoch_batches"])
    device = trainer.device
    trainer.window.loss, trainer.window.task = t["window/loss"].to(device), t["window/task"].to(device)
    trainer.window.n = int(meta["window_n"])
    trainer.q_now = t["window/q"].to(device)
    trainer.step = state.step
    trainer.pending = list(meta["pending"])
    trainer.result.history = list(meta["history"])
    trainer.result.surgeries = int(meta["surgeries"])
    trainer.elapsed_s, trainer.other_s = float(meta["elapsed_s"]), float(meta["other_s"])


def _restore_optimizer(trainer: Trainer, t: dict[str, torch.Tensor], strides: dict) -> None:
    """AdamW's per-parameter state, matched to the parameters by name."""
    params = dict(trainer.model.named_parameters())
    opt = trainer.optimizer
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    opt.state.clear()
    for key, value in t.items():
        if not key.startswith("optim/"):
            continue
        name, _, slot = key.removeprefix("optim/").rpartition("/")
        p = params.get(name)
        if p is None or id(p) not in group_of:
            raise FormatError(f"the training checkpoint holds optimizer state for {name!r}, "
                              "which this model does not train.")
        group = group_of[id(p)]
        if slot == "step" and not (group.get("capturable") or group.get("fused")):
            opt.state[p][slot] = value  # AdamW keeps its step count on the CPU
            continue
        if value.shape != p.shape:
            raise FormatError(f"the training checkpoint's {key} has shape {list(value.shape)} "
                              f"but the parameter has {list(p.shape)}.")
        opt.state[p][slot] = _laid_out(value.to(p.device), strides.get(key))


def _laid_out(tensor: torch.Tensor, stride: list[int] | None) -> torch.Tensor:
    """`tensor` with the given strides (None: the default, contiguous layout)."""
    want = tuple(stride) if stride is not None else _default_strides(tensor.shape)
    if tensor.stride() == want or math.prod(tensor.shape) == 0:
        return tensor
    out = torch.empty_strided(tensor.shape, want, dtype=tensor.dtype, device=tensor.device)
    return out.copy_(tensor)
