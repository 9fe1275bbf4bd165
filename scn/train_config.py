"""How to train: every `trainer.` key of the command line, validated, and the device it names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from scn import config, distributed
from scn.errors import ConfigError

SURGERY_MODES = ("physical", "masked", "off")


@dataclass
class TrainConfig:
    """How to train. Every field is a `trainer.` key on the command line."""

    # -- length and optimisation
    max_epochs: int = 8
    max_steps: int = 0  # > 0 stops early (tests, smoke runs)
    batch_size: int = 128
    lr: float = 3e-3  # weights (AdamW), with warm-up and cosine decay
    lr_quant: float = 0.005  # b and e (Adam, no weight decay)
    # b and e's schedule: "cosine" follows the weights' (warm-up, cosine decay to 0); "constant"
    # stays at lr_quant after the warm-up, so bit depths keep moving while the weights settle.
    quant_lr_schedule: str = "cosine"
    weight_decay: float = 5e-4
    warmup: float = 0.03  # fraction of training spent warming the learning rate up
    # Fraction of training, at its end, with the bit depths and exponents frozen (their lr 0):
    # the weights then fine-tune on a fixed bit allocation; 0 = learn them to the last step.
    freeze_quant: float = 0.0
    # > 0: a size budget, the % of the weights left at which the network stops shrinking: from
    # the first surgery that reaches it, gamma is 0 (no more deaths) and the rest of the run
    # recovers at that size. 0 = gamma follows size_loss to the end.
    stop_shrinking_at: float = 0.0
    # > 0: at that budget, live channels stored with fewer bits are raised to this many, their
    # grid refined (scn.quant.SCLayer.refine_bits): the bits the network no longer spends on
    # channels go to the survivors' precision. 0 = they keep their bits.
    budget_bits: int = 0
    # At that budget, hold every bit depth where it is (b's gradient dropped): no channel dies or
    # gains bits after it, so the run ends at the budget's size and bits; e and weights train on.
    hold_bits: bool = False
    # -- surgery
    surgery: str = "physical"  # physical: remove dead channels; masked: only mask them; off
    # Steps between surgeries; 0 = no surgery (as surgery=off); "freeze" = one surgery, at the
    # step where freeze_quant freezes b and e (no channel dies after it).
    prune_every: int | Literal["freeze"] = 200
    channel_multiple: int = 1  # physical surgery leaves channel counts at multiples of this
    # -- evaluation
    eval_every: int = 0  # steps between test evaluations; 0 = once per epoch
    # Training batches that re-estimate BatchNorm statistics before each evaluation (and the
    # export); 0 = evaluate with the running averages (docs/design.md says why not).
    recalibrate_bn: int = 20
    # -- runtime
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    amp: bool = True  # bf16 autocast on CUDA (CPU always runs float32)
    channels_last: bool = True
    compile: bool = False  # torch.compile the model (re-compiled after each surgery)
    # Under torchrun: BatchNorm statistics of the whole global batch (every rank's slice), as
    # one process computes them; off: each rank normalises with its own slice's statistics.
    sync_norms: bool = False
    # -- bookkeeping (none of these changes the result, nor the config hash)
    checkpoint_every: int = 500  # steps between training checkpoints (resume); 0 = at the end only
    # > 0: this invocation trains at most this many steps, then writes a training checkpoint
    # and stops with status "paused"; resume=true goes on from it. For jobs with a time limit,
    # and for training several runs in turns (scripts/bench_removal.py). 0 = train to the end.
    pause_after_steps: int = 0
    log_every: int = 25  # steps between progress-bar updates (a host-device sync on GPU)
    progress: bool = True
    # model.scn with an entropy-coded payload (scn.entropy; format version 2), when smaller.
    # Changes the file, not the model: in the config hash only when on.
    entropy_code: bool = False

    # Valid ranges and choices (a class attribute, not a field). scn.config checks them with
    # the field types here and, from the command line, before anything is built.
    LIMITS = {
        "max_epochs": config.POSITIVE, "max_steps": config.NON_NEGATIVE,
        "batch_size": config.POSITIVE, "lr": config.NON_NEGATIVE,
        "lr_quant": config.NON_NEGATIVE, "weight_decay": config.NON_NEGATIVE,
        "warmup": config.Range(0, 1, high_open=True), "eval_every": config.NON_NEGATIVE,
        "recalibrate_bn": config.NON_NEGATIVE, "freeze_quant": config.Range(0, 1, high_open=True),
        "log_every": config.POSITIVE, "surgery": SURGERY_MODES,
        "quant_lr_schedule": ("cosine", "constant"),
        "prune_every": config.NON_NEGATIVE, "checkpoint_every": config.NON_NEGATIVE,
        "channel_multiple": config.POSITIVE, "pause_after_steps": config.NON_NEGATIVE,
        "stop_shrinking_at": config.Range(0, 100), "budget_bits": config.Range(0, 16),
    }

    @property
    def does_surgery(self) -> bool:
        """Whether dead channels are cut (or masked) during training: the channel graph is traced."""
        return self.surgery != "off" and bool(self.prune_every)

    def __post_init__(self) -> None:
        config.validate(self, "trainer", self.LIMITS)
        pick_device(self.device)  # an unknown device, or CUDA where there is none, fails now
        if self.budget_bits and not self.stop_shrinking_at:
            raise config.invalid("trainer.budget_bits", self.budget_bits,
                                 "0 unless trainer.stop_shrinking_at sets the size budget at "
                                 "which the survivors' bits are raised")
        if self.hold_bits and not self.stop_shrinking_at:
            raise config.invalid("trainer.hold_bits", self.hold_bits,
                                 "false unless trainer.stop_shrinking_at sets the size budget at "
                                 "which the bit depths are held")
        if self.prune_every == "freeze" and not self.freeze_quant:
            raise config.invalid("trainer.prune_every", self.prune_every,
                                 "an integer >= 0 unless trainer.freeze_quant > 0 (\"freeze\" "
                                 "operates at the step where the bit depths freeze)")


def pick_device(name: str) -> torch.device:
    if name == "auto":  # under torchrun each rank takes the GPU of its local rank
        if not torch.cuda.is_available():
            return torch.device("cpu")
        group = distributed.current()
        return torch.device("cuda", group.local_rank) if group else torch.device("cuda")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise config.invalid("trainer.device", name, "auto, cpu, cuda or cuda:N (e.g. cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name!r} but CUDA is not available here; use "
                          "trainer.device=auto or cpu.")
    return device
