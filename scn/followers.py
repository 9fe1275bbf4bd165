"""A distributed run's ranks other than 0: they train, rank 0 decides and writes.

Rank 0 owns the run folder (its lock, refusals, resume, every file). It tells the others, with
one broadcast each, where training starts (the training checkpoint's state, or none) and how
the run ended (its summary, or the error that stopped it), so that every rank enters and
leaves training together and no rank ever writes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scn import distributed
from scn import resume as train_state
from scn.errors import ScnError
from scn.train import Reporter, Trainer, learns_bits

if TYPE_CHECKING:
    from scn.experiment import Experiment


class Leader:
    """Rank 0's side: say when training starts and how the run ended (a no-op in one process)."""

    def __init__(self) -> None:
        self.group = distributed.current()
        self.training = False  # the others are inside training: only its end may be announced
        self.trained = False

    def start(self, state: train_state.State | None) -> None:
        if self.group is not None:
            distributed.broadcast_object(("train", state))
        self.training = True

    def finish(self, summary: dict) -> None:
        if self.group is not None:
            distributed.broadcast_object(("end" if self.training else "stop", summary))

    def fail(self, message: str) -> None:
        """Before or after training (never during: the others wait in another collective)."""
        if self.group is not None and (not self.training or self.trained):
            distributed.broadcast_object(("error", message))


def follow(exp: Experiment) -> dict:
    """Train as rank 0 does, report nothing, return rank 0's summary (or raise its error)."""
    kind, payload = distributed.broadcast_object()
    if kind == "train":
        state = payload
        model = train_state.build_model(state) if state else exp.build_model()
        trainer = Trainer(model, exp.data, exp.trainer, exp.schedule, learns_bits(model), exp.seed)
        if state:
            train_state.restore(trainer, state)
        trainer.run(Reporter())
        kind, payload = distributed.broadcast_object()
    if kind == "error":
        raise ScnError(payload)
    return payload
