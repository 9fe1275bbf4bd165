"""Training-step time of float small CNNs at given channel counts, against width 32, in turns.

Which shapes could a shrinking run end at and still take 0.7x the float run's time? Each shape
is a float `SmallCNN` (four convolutions' channels) trained for 30 steps on synthetic data of
Fashion-MNIST's shape, in four turns with the full width-32 model so that the ratios share the
machine's state; the median step of each is reported (docs/study/channel_removal.md, twelfth
round).

    python experiments/shape_step_time.py 24,48,40,32 24,40,48,32 32,56,32,32
"""

from __future__ import annotations

import argparse
import statistics

from scn.data import synthetic
from scn.methods import Float, quantize_
from scn.models import build
from scn.schedule import Constant
from scn.train import TrainConfig, Trainer

CONFIG = TrainConfig(max_epochs=1, max_steps=30, batch_size=128, prune_every=0, eval_every=1000,
                     progress=False, recalibrate_bn=0, checkpoint_every=0)
FULL = [32, 64, 64, 128]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shapes", nargs="+", help="four channel counts each, comma-separated")
    shapes = [FULL] + [[int(c) for c in s.split(",")] for s in p.parse_args().shapes]
    data = synthetic(num_train=128 * 40, num_test=256, num_classes=10)
    nets = [quantize_(build("SmallCNN", in_channels=1, num_classes=10, channels=c), Float())
            for c in shapes]
    times: list[list[float]] = [[] for _ in shapes]
    for _ in range(4):
        for net, t in zip(nets, times, strict=True):
            t.append(Trainer(net, data, CONFIG, Constant(gamma=0.0), learn_bits=False).run().step_time_s)
    full = statistics.median(times[0])
    for shape, t in zip(shapes, times, strict=True):
        step = statistics.median(t)
        print(f"{str(tuple(shape)):18s} {step * 1e3:6.1f} ms a step ({step / full:.2f}x width 32; "
              f"turns {min(t) * 1e3:.0f}-{max(t) * 1e3:.0f} ms)")


if __name__ == "__main__":
    main()
