"""Two ranks hold different bit depths: what scn says (run by tests/test_distributed.py)."""

import sys

import torch

from scn import distributed

group = distributed.start("cpu")
try:
    distributed.check_same("bit depths", torch.tensor([3.0, 2.0 + group.rank]))
    print("agreed")
except distributed.DistributedError as exc:
    print(f"rank {group.rank}: {exc}")
    sys.exit(3)
finally:
    distributed.stop()
