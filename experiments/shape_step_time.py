"""Training-step time of float small CNNs at given channel counts, against width 32, in turns.

Which shapes could a shrinking run end at and still take 0.7x the float run's time? Each shape
is a float `SmallCNN` (four convolutions' channels) timed with `dead_channel_cost.step_times`
(30 steps on synthetic data of Fashion-MNIST's shape, four turns with the full width-32 model, so
that the ratios share the machine's state); the median step of each is reported
(docs/study/channel_removal.md, twelfth round).

    python experiments/shape_step_time.py 24,48,40,32 24,40,48,32 32,56,32,32
"""

from __future__ import annotations

import argparse
import statistics

from dead_channel_cost import step_times

from scn.methods import Float, quantize_
from scn.models import build

FULL = [32, 64, 64, 128]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shapes", nargs="+", help="four channel counts each, comma-separated")
    shapes = [FULL] + [[int(c) for c in s.split(",")] for s in p.parse_args().shapes]
    nets = {str(tuple(c)): (quantize_(build("SmallCNN", in_channels=1, num_classes=10, channels=c),
                                      Float()), False) for c in shapes}
    times = step_times(nets)
    full = statistics.median(times[str(tuple(FULL))])
    for name, t in times.items():
        step = statistics.median(t)
        print(f"{name:18s} {step * 1e3:6.1f} ms a step ({step / full:.2f}x width 32; "
              f"turns {min(t) * 1e3:.0f}-{max(t) * 1e3:.0f} ms)")


if __name__ == "__main__":
    main()
