"""Training checkpoints: a Trainer's state_dict() on disk, so a killed run goes on exactly.

`<run folder>/checkpoint/train_state.safetensors`, written every `trainer.checkpoint_every`
steps and at the end, atomically (scn.io: the previous file stays until the new one is
complete). No pickle: the state's tensors are safetensors entries (laid out contiguously;
their original strides, e.g. channels-last, recorded in the header), everything else is JSON
in the metadata entry "scn": format, version, the model's description (checkpoint.describe),
the trainer's meta (step, total_steps, epoch position, lr and scheduler state, pending rows,
history, timers) and what the caller adds (scn.experiment: config_hash, config, CSV rows).

Restoring: `load` reads and checks the file, `build_model` rebuilds the model at its stored
shapes (checkpoint.rebuild), and after a Trainer is built around that model, `restore` hands
it the state (Trainer.load_state_dict).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from scn import checkpoint, container, io
from scn.errors import ConfigError, FormatError, NumericalError

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
    live = trainer.state_dict()
    tensors = live["tensors"]
    strides = {k: list(v.stride()) for k, v in tensors.items() if v.stride() != _default_strides(v.shape)}
    copies = {k: v.cpu().clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
    meta = {"format": FORMAT, "version": VERSION, "model": checkpoint.describe(trainer.model, dataset),
            **live["meta"], "strides": strides, **info}
    return State(copies, meta)


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


def save(path: str | Path, state: State) -> None:
    """Write `state` atomically (after checking it is finite), checksummed like every scn file."""
    check_finite(state)
    # Serialized in memory and written by Python: a full disk is then an OSError naming the
    # file, where safetensors' own writer raises a SafetensorError without one.
    io.write_bytes(path, container.write(st_save, state.tensors, state.meta, allow_nan=True))


# ---------------------------------------------------------------------------------------------
# Reading and restoring


def load(path: str | Path) -> State:
    """Read a training checkpoint; a FormatError says what is wrong with a bad one.

    The whole file is checked against its checksum first, so a damaged header (a flipped digit
    of its step, say) is refused, never resumed from.
    """
    try:
        meta, raw = container.read(path, FORMAT, VERSION, finite=False)  # rows may hold NaN
    except FormatError as exc:
        raise _unreadable(path, str(exc).removeprefix(f"{path} ").rstrip(".")) from None
    try:
        tensors = st_load(raw)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise _unreadable(path, str(exc)) from None
    return State(tensors, meta)


def _unreadable(path: str | Path, why: str) -> FormatError:
    return FormatError(f"{path} is not a readable training checkpoint ({why}). To start the "
                       "run over, run the same command without resume=true (which replaces it).")


def build_model(state: State) -> nn.Module:
    """The model of the checkpoint, at its stored shapes and with its stored values."""
    values = {k.removeprefix("model/"): v for k, v in state.tensors.items() if k.startswith("model/")}
    stored = sum(v.numel() * v.element_size() for v in state.tensors.values())
    model = checkpoint.rebuild(state.meta["model"], {k: tuple(v.shape) for k, v in values.items()},
                               max_scalars=max(1 << 24, 64 * stored))
    try:
        checkpoint.load_tensors(model, values)
    except RuntimeError as exc:
        raise FormatError(f"the training checkpoint does not fit the model it names ({exc}).") from None
    return model


def restore(trainer: Trainer, state: State) -> None:
    """Hand `state` to `trainer` (built around `build_model(state)`, with the same config)."""
    strides = state.meta.get("strides", {})
    tensors = {k: _laid_out(v, strides.get(k)) for k, v in state.tensors.items()}
    try:
        trainer.load_state_dict({"tensors": tensors, "meta": state.meta})
    except ConfigError as exc:
        raise FormatError(f"the training checkpoint does not fit this run: {exc}") from None


def _laid_out(tensor: torch.Tensor, stride: list[int] | None) -> torch.Tensor:
    """`tensor` with the given strides (None: the default, contiguous layout)."""
    want = tuple(stride) if stride is not None else _default_strides(tensor.shape)
    if tensor.stride() == want or math.prod(tensor.shape) == 0:
        return tensor
    out = torch.empty_strided(tensor.shape, want, dtype=tensor.dtype, device=tensor.device)
    return out.copy_(tensor)
