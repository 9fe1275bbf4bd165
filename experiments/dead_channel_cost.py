"""What the dead channels surgery cannot fold cost a trained network's training step.

A channel that dies after its producer folded an earlier dead input carries that fold's image,
which varies at the borders, and stays in the network at 0 bits (docs/study/channel_removal.md,
eleventh round). This probe loads a finished run's final training state, makes a copy in which
those channels' folded offsets are dropped so that surgery cuts them (for timing only: the copy
is not the trained function), and times training steps of the run's network, of the cut copy
and of the float model at width 32, in turns (median of four turns of 30 steps, synthetic data
of the same shape), so that the ratios share the machine's state.

    python experiments/dead_channel_cost.py outputs/study/w32_paper_flops4_seed1
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

from scn import resume, surgery
from scn.data import synthetic
from scn.methods import Float, quantize_
from scn.models import build
from scn.quant import sc_layers
from scn.schedule import Constant
from scn.train import TrainConfig, Trainer

CONFIG = TrainConfig(max_epochs=1, max_steps=30, batch_size=128, prune_every=0, eval_every=1000,
                     progress=False, recalibrate_bn=0, checkpoint_every=0)


def cut_copy(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with every dead channel removed, its folded offset dropped first."""
    cut = copy.deepcopy(model)
    for _, layer in sc_layers(cut):
        if layer.input_offset.dim() == 4:
            layer.input_offset[~layer.live_out()] = 0
    surgery.prune(cut, surgery.trace(cut, torch.zeros(1, 1, 28, 28)), physical=True, multiple=8)
    return cut


def widths(model: torch.nn.Module) -> list[tuple[int, int]]:
    """(channels computed, channels live) of each convolution."""
    return [(m.weight.shape[0], int(m.live_out().sum())) for _, m in sc_layers(model)][:-1]


def step_times(nets: dict[str, tuple[torch.nn.Module, bool]], turns: int = 4) -> dict[str, list[float]]:
    """Each network's median training step (seconds) in each of `turns` turns of 30 steps on
    synthetic data of Fashion-MNIST's shape; (network, learns its bits) by name. The networks take
    turns, so that their ratios share the machine's state."""
    data = synthetic(num_train=128 * 40, num_test=256, num_classes=10)
    times: dict[str, list[float]] = {name: [] for name in nets}
    for _ in range(turns):
        for name, (net, learns) in nets.items():
            trainer = Trainer(net, data, CONFIG, Constant(gamma=0.0), learn_bits=learns)
            times[name].append(trainer.run().step_time_s)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a finished Fashion-MNIST run of the small CNN (its checkpoint/)")
    trained = resume.build_model(resume.load(resume.path_in(p.parse_args().run_dir)))
    cut = cut_copy(trained)
    print(f"computed/live channels: as trained {widths(trained)}, cut {widths(cut)}")
    float_w32 = quantize_(build("SmallCNN", in_channels=1, num_classes=10, width=32), Float())
    nets = {"as trained": (trained, True), "dead cut": (cut, True), "float w32": (float_w32, False)}
    median = {name: statistics.median(t) for name, t in step_times(nets).items()}
    for name, t in median.items():
        print(f"{name:10s} {t * 1e3:6.1f} ms a step ({t / median['float w32']:.2f}x float, "
              f"{t / median['as trained']:.2f}x as trained)")


if __name__ == "__main__":
    main()
