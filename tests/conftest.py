import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SCN_TRAIN = Path(sys.executable).parent / "scn-train"
sys.path.insert(0, str(ROOT / "scripts"))  # benchmark scripts import their harness by name

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
