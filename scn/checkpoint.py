"""The training checkpoint `model.safetensors`: float weights, b and e, and how to rebuild.

A plain safetensors file (no pickle) whose metadata entry "scn" holds a JSON header:
the model's registered name and arguments, the quantization scheme, the size reference and
the dataset's description. Loading builds the original model, converts it with the same
scheme, shrinks each tensor to the stored shape (channels removed by surgery) and loads the
values, so a shrunk model comes back shrunk.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from safetensors.torch import save as st_save
from torch import nn

from scn import io
from scn.errors import FormatError, ScnError
from scn.models import build
from scn.quant import SCConv2d, Scheme, SCLinear, quantize_
from scn.size import Reference

CHECKPOINT_FORMAT = "scn-checkpoint"
CHECKPOINT_VERSION = 1


def describe(model: nn.Module, dataset: dict | None = None) -> dict:
    """The JSON header that lets a file rebuild `model` without the training config."""
    for attr in ("scn_spec", "scn_scheme", "scn_reference"):
        if not hasattr(model, attr):
            raise ValueError(f"model lacks {attr}: build it with scn.models.build and convert "
                             "it with scn.quantize_ before saving")
    return {
        "model": model.scn_spec,
        "scheme": asdict(model.scn_scheme),
        "reference": asdict(model.scn_reference),
        "dataset": dataset or {},
    }


def rebuild(header: dict, shapes: dict[str, tuple[int, ...]],
            max_scalars: int | None = None) -> nn.Module:
    """Build the model a header describes, with every tensor resized to `shapes`.

    With `max_scalars` (for files from elsewhere), the model is first built on the meta device,
    where nothing is allocated, and refused if it holds more parameters and buffers than that
    or far more modules than the file has tensors: a damaged or hostile header must not make
    scn allocate gigabytes or loop for hours.
    """
    try:
        spec, scheme = header["model"], Scheme(**header["scheme"])
        if max_scalars is not None:
            _probe(spec, max_scalars, max_modules=16 * len(shapes) + 64)
        model = quantize_(build(spec["name"], **spec["kwargs"]), scheme)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, OverflowError) as exc:
        raise FormatError(f"the file's header does not describe a model scn can build ({exc})") from exc
    except FormatError:
        raise
    except ScnError as exc:
        raise FormatError(f"the file's header describes a model scn cannot build: {exc}") from exc
    model.scn_reference = Reference(**header["reference"])
    resize(model, shapes)
    return model


def _probe(spec: dict, max_scalars: int, max_modules: int) -> None:
    """Build `spec` on the meta device, stopping as soon as it outgrows the limits."""
    def count(parent: nn.Module, name: str, module: nn.Module) -> None:
        modules[0] += 1
        if modules[0] > max_modules:
            raise FormatError(f"the file's header describes a model of more than {max_modules} "
                              "modules, far more than the file holds tensors; the file is corrupt.")

    modules = [0]
    handle = torch.nn.modules.module.register_module_module_registration_hook(count)
    try:
        with torch.device("meta"):
            probe = build(spec["name"], **spec["kwargs"])
    finally:
        handle.remove()
    scalars = sum(t.numel() for t in (*probe.parameters(), *probe.buffers()))
    if scalars > max_scalars:
        raise FormatError(f"the file's header describes a model of {scalars:,} values, far more "
                          "than the file can hold; the file is corrupt.")


def resize(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
    """Give every parameter and buffer the stored shape and fix the modules' size attributes."""
    own = model.state_dict(keep_vars=True)
    unknown = sorted(set(shapes) - set(own))
    if unknown:
        raise FormatError(f"the file holds tensors this model does not have: {unknown[:5]}")
    for key, tensor in own.items():
        if key in shapes and tuple(tensor.shape) != tuple(shapes[key]):
            tensor.data = torch.zeros(shapes[key], dtype=tensor.dtype, device=tensor.device)
    for module in model.modules():
        if isinstance(module, SCConv2d):
            module.out_channels, module.in_channels = module.weight.shape[:2]
        elif isinstance(module, SCLinear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            source = module.weight if module.weight is not None else module.running_mean
            module.num_features = source.shape[0]


def save_checkpoint(model: nn.Module, path: str | Path, dataset: dict | None = None) -> None:
    header = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **describe(model, dataset)}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # In memory, then written by Python: a full disk is an OSError naming the file.
    io.write_bytes(path, st_save(state, metadata={"scn": json.dumps(header)}))


def read_header(path: str | Path, expected_format: str = CHECKPOINT_FORMAT) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise FormatError(f"{path} is not a readable safetensors file ({exc}); it may be "
                          "truncated or not an scn checkpoint.") from exc
    try:
        header = json.loads(meta["scn"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path} is a safetensors file but not an scn checkpoint "
                          "(no valid 'scn' metadata).") from exc
    if header.get("format") != expected_format:
        raise FormatError(f"{path} is a {header.get('format')!r} file, not {expected_format!r}.")
    if header.get("version") != CHECKPOINT_VERSION:
        raise FormatError(f"{path} is version {header.get('version')!r} of the checkpoint format; "
                          f"this scn reads version {CHECKPOINT_VERSION}. Upgrade scn.")
    return header


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model stored at `path` (its shrunk shape included); returns (model, header)."""
    header = read_header(path)
    try:
        state = load_file(str(path), device=device)
    except (SafetensorError, OSError) as exc:
        raise FormatError(f"{path}: the tensor data is unreadable ({exc}).") from exc
    model = rebuild(header, {k: tuple(v.shape) for k, v in state.items()},
                    max_scalars=max(1 << 24, 1024 * Path(path).stat().st_size))
    model.load_state_dict(state, strict=True)
    return model.eval(), header
