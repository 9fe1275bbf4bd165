"""One run over several processes (torchrun): the data split, DDP, and the checks that keep
every rank's network the same through channel surgery.

    torchrun --nproc_per_node=N .venv/bin/scn-train <overrides>

Every rank draws the same global batch (the same generator) and trains on its slice of it;
DDP averages the gradients, b and e included, so the parameters stay equal on every rank and
each rank decides the same dead channels from them (checked: an all-reduce of every bit depth
that stops the run if ranks disagree). After a surgery each rank shrinks its own copy, slices
its optimizer state, and DDP is rebuilt around the new shapes. Rank 0 alone writes the run
folder; the others learn from it where to start and how the run ended.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from scn.errors import ConfigError, ScnError

TIMEOUT_S = float(os.environ.get("SCN_DIST_TIMEOUT_S", 600))  # a collective waits this long at most


class DistributedError(ScnError):
    """Ranks disagree, or one stopped: the run cannot go on."""


@dataclass(frozen=True)
class Group:
    rank: int
    world_size: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0


_ACTIVE: Group | None = None


def _slurm_tasks() -> int:
    """Tasks of a SLURM job step that submitit started (hydra/launcher=slurm_ddp), else 0."""
    return int(os.environ.get("SLURM_NTASKS", "0")) if "SUBMITIT_EXECUTOR" in os.environ else 0


def launched() -> bool:
    """Whether this process is one of several started by torchrun (or SLURM via submitit)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or _slurm_tasks() > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def start(device_type: str) -> Group | None:
    """Join the process group (gloo on CPU, NCCL on CUDA); None when not launched by torchrun."""
    global _ACTIVE
    if _ACTIVE is not None or not launched():
        return _ACTIVE
    backend = "nccl" if device_type == "cuda" else "gloo"
    if "RANK" not in os.environ and _slurm_tasks() > 1:  # RANK, WORLD_SIZE, MASTER_* from SLURM's
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export()
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"cannot join the other ranks ({str(exc).splitlines()[0]}). Start "
                               "the run with torchrun (it sets RANK, WORLD_SIZE, MASTER_ADDR and "
                               "MASTER_PORT).") from None
    _ACTIVE = Group(dist.get_rank(), dist.get_world_size(), local_rank())
    return _ACTIVE


def current() -> Group | None:
    return _ACTIVE


def world_size() -> int:
    """Processes in this run: 1 without torchrun."""
    return _ACTIVE.world_size if _ACTIVE is not None else 1


def stop() -> None:
    global _ACTIVE
    if _ACTIVE is not None and dist.is_initialized():
        dist.destroy_process_group()
    _ACTIVE = None


def check_batch(batch_size: int) -> None:
    group = current()
    if group is not None and batch_size % group.world_size:
        raise ConfigError(f"trainer.batch_size={batch_size} must divide evenly among the "
                          f"{group.world_size} ranks (the global batch is split between them); "
                          f"use a multiple of {group.world_size}.")


def shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous slice of a global batch."""
    group = current()
    n = len(t) // group.world_size
    return t[group.rank * n:(group.rank + 1) * n]


def mean(t: torch.Tensor) -> torch.Tensor:
    """The average over ranks of a per-rank value (a loss on this rank's slice)."""
    total = t.detach().clone()
    _collective(dist.all_reduce, total)
    return total / current().world_size


def check_same(what: str, t: torch.Tensor) -> None:
    """Stop, naming `what`, unless `t` is equal on every rank."""
    low, high = t.detach().clone(), t.detach().clone()
    _collective(dist.all_reduce, low, op=dist.ReduceOp.MIN)
    _collective(dist.all_reduce, high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise DistributedError(f"the ranks disagree on the {what} (seen by rank {current().rank}), "
                               "so they would cut different channels. The ranks "
                               "must run the same code on the same data and seed; rerun, and "
                               "report it if it happens again.")


def broadcast_object(obj=None):
    """Rank 0's `obj` on every rank."""
    box = [obj]
    _collective(dist.broadcast_object_list, box, src=0)
    return box[0]


def sync_buffers(model: nn.Module) -> None:
    """Every rank takes rank 0's buffers (BatchNorm statistics, masks)."""
    for buffer in model.buffers():
        if not buffer.numel():
            continue
        if buffer.dtype == torch.bool:  # gloo does not broadcast bool tensors
            carrier = buffer.to(torch.uint8)
            _collective(dist.broadcast, carrier, src=0)
            buffer.copy_(carrier.bool())
        else:
            _collective(dist.broadcast, buffer, src=0)


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP around the model as it is now (rebuilt after every surgery)."""
    import inspect
    import warnings

    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # Buffers are synchronised where it matters (before surgery, evaluation), not every step.
    sync = ("forward_sync_buffers" if "forward_sync_buffers" in
            inspect.signature(DistributedDataParallel.__init__).parameters else "broadcast_buffers")
    # A 1-input-channel weight has two equally valid channels-last strides; DDP notes the
    # mismatch with its bucket at every step, harmlessly.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DistributedDataParallel(model, device_ids=ids, **{sync: False})


_SYNCING = False  # set while a training step's forward pass runs (scn.train)


class synced_norms:
    """Within it, SyncBatchNorm2d layers in training mode use the global batch's statistics."""

    def __init__(self, on: bool = True) -> None:
        self.on = on

    def __enter__(self):
        global _SYNCING
        self.before, _SYNCING = _SYNCING, self.on

    def __exit__(self, *exc):
        global _SYNCING
        _SYNCING = self.before


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are the global batch's, over every rank.

    torch's SyncBatchNorm runs on GPUs only; this runs wherever an all-reduce does (gloo on
    CPU too). It is a BatchNorm2d to everything else (surgery slices it as one), and it
    synchronises only inside `synced_norms()`, so evaluation and file writing stay local.
    The statistics' all-reduce is differentiable: its backward sums the gradients of every
    rank's loss, as one process's backward would.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _SYNCING and current() is not None):
            return super().forward(x)
        c, dims = x.shape[1], (0, 2, 3)
        local = torch.cat([x.sum(dims), (x * x).sum(dims), x.new_full((1,), x.numel() // c)])
        total = _SumOverRanks.apply(local)
        n = total[-1]
        mean = total[:c] / n
        var = total[c:2 * c] / n - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                          else self.momentum)
                self.running_mean.mul_(1 - factor).add_(factor * mean.detach())
                self.running_var.mul_(1 - factor).add_(factor * var.detach() * n / (n - 1))
        shape = (1, c, 1, 1)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


class _SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over ranks; its gradient is the sum of every rank's gradient."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        total = t.clone()
        _collective(dist.all_reduce, total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        _collective(dist.all_reduce, grad)
        return grad


def convert_norms(model: nn.Module) -> None:
    """Every plain BatchNorm2d of `model` becomes a SyncBatchNorm2d (same object, same state)."""
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = SyncBatchNorm2d


def _collective(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistBackendError) as exc:
        raise DistributedError(f"another rank stopped or cannot be reached "
                               f"({str(exc).splitlines()[0][:200]}); this rank stops too. The "
                               "first error printed, by the rank that failed, says why.") from None
