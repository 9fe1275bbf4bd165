"""`model.init_from=PATH`: start from a trained float network (self-compression as fine-tuning).

The file is a state dict of the same architecture: safetensors, or a torch file read with
`weights_only=True` (no code runs), either the dict itself or one under "state_dict" / "model".
A float scn run's `model.safetensors` (quant=none) qualifies: its layers' bookkeeping buffers
(`in_alive`, `input_offset`) are dropped when they say nothing was removed.
Parameters on the meta device (the size checks before training) are left as they are.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from scn.checkpoint import load_tensors
from scn.errors import ConfigError


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model.init_from={str(path)!r} is not a file; give the path of a "
                          "trained float state dict (.safetensors, or a torch .pt/.pth file).")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # several libraries, several error types: one message
        raise ConfigError(f"model.init_from: {path} cannot be read as a state dict ({exc}).") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(f"model.init_from: {path} does not hold a state dict of tensors.")
    return state


_SCN_BUFFERS = (".in_alive", ".input_offset")


def _float_part(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """`state` without scn's layer buffers, refused where they record a quantized or cut model."""
    if any(k.endswith(".b") and f"{k[:-2]}.e" in state for k in state):
        raise ConfigError(f"model.init_from: {path} holds a quantized scn model (it has bit depths); "
                          "start from a float one, e.g. the model.safetensors of a quant=none run "
                          "(to continue a self-compressing run, resume it instead).")
    cut = [k for k, v in state.items()
           if (k.endswith(".in_alive") and not bool(v.all())) or (k.endswith(".input_offset") and v.any())]
    if cut:
        raise ConfigError(f"model.init_from: {path} holds a model with removed inputs ({cut[:2]}); "
                          "start from an uncut float model.")
    return {k: v for k, v in state.items() if not k.endswith(_SCN_BUFFERS)}


def load_float_state(model: nn.Module, path: str | Path) -> None:
    """Load `path` into the float `model` (before scn.quantize_), exactly, or say what differs."""
    if any(p.device.type == "meta" for p in model.parameters()):
        return
    state = _float_part(read_state(path), Path(path))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        detail = "; ".join(part for part in (
            missing and f"missing {missing[:3]}", unexpected and f"unexpected {unexpected[:3]}",
            wrong and f"other shapes for {wrong[:3]}") if part)
        raise ConfigError(f"model.init_from: {path} is not a state dict of this model ({detail}). "
                          "Build the model with the same model.* settings and dataset as the "
                          "run that trained it.")
    load_tensors(model, state)
