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


def launched() -> bool:
    """Whether this process is one of several started by torchrun (or SLURM via submitit)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def start(device_type: str) -> Group | None:
    """Join the process group (gloo on CPU, NCCL on CUDA); None when not launched by torchrun."""
    global _ACTIVE
    if _ACTIVE is not None or not launched():
        return _ACTIVE
    backend = "nccl" if device_type == "cuda" else "gloo"
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
        raise DistributedError(f"the ranks disagree on the {what} (rank {current().rank} differs "
                               "from another), so they would cut different channels. The ranks "
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


def _collective(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistBackendError) as exc:
        raise DistributedError(f"another rank stopped or cannot be reached "
                               f"({str(exc).splitlines()[0][:200]}); this rank stops too. The "
                               "first error printed, by the rank that failed, says why.") from None
