"""The training checkpoint `model.safetensors`: float weights, b and e, and how to rebuild.

A plain safetensors file (no pickle) whose metadata entry "scn" holds a JSON header:
the model's registered name and arguments, the quantization scheme, the size reference and
the dataset's description. Loading builds the original model, converts it with the same
scheme, shrinks each tensor to the stored shape (channels removed by surgery) and loads the
values, so a shrunk model comes back shrunk.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from scn import container, io
from scn.errors import FormatError, ScnError
from scn.methods import from_header, quantize_
from scn.models import MODELS, build
from scn.quant import SCConv2d, SCLinear
from scn.reference import Reference

CHECKPOINT_FORMAT = "scn-checkpoint"
CHECKPOINT_VERSION = 1


def load_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], strict: bool = True) -> None:
    """`model.load_state_dict(tensors)` keeping the model's own state-dict metadata (some
    modules, e.g. torchvision's MNASNet, read their version from it). Unexpected keys always
    raise; missing ones too when `strict`, else the model keeps its own values for them."""
    state = model.state_dict()
    missing = [k for k in state if k not in tensors]
    if strict and missing:
        raise RuntimeError(f"missing keys {missing[:4]}")
    state.update(tensors)
    model.load_state_dict(state, strict=True)


def describe(model: nn.Module, dataset: dict | None = None) -> dict:
    """The JSON header that lets a file rebuild `model` without the training config.

    A model scn.models built is named with its arguments; any other converted model is
    described as `{"name": null}`: loading it needs a freshly built skeleton of it.
    """
    for attr in ("scn_scheme", "scn_reference"):
        if not hasattr(model, attr):
            raise ValueError(f"model lacks {attr}: convert it with scn.quantize_ before saving")
    return {
        "model": getattr(model, "scn_spec", None) or {"name": None, "kwargs": {}},
        "scheme": model.scn_scheme.header(),
        "reference": asdict(model.scn_reference),
        "dataset": dataset or {},
    }


def rebuild(header: dict, shapes: dict[str, tuple[int, ...]],
            max_scalars: int | None = None, skeleton: nn.Module | None = None) -> nn.Module:
    """Build the model a header describes, with every tensor resized to `shapes`.

    `skeleton`: a freshly built model of the same architecture (float, or converted), used
    instead of scn's registry; required for models the registry did not build.
    With `max_scalars` (for files from elsewhere), the model is first built on the meta device,
    where nothing is allocated, and refused if it holds more parameters and buffers than that
    or far more modules than the file has tensors: a damaged or hostile header must not make
    scn allocate gigabytes or loop for hours.
    """
    try:
        spec, scheme = header["model"], from_header(header["scheme"])
        reference = Reference(**header["reference"])
        if skeleton is not None:
            model = skeleton
            if not any(isinstance(m, (SCConv2d, SCLinear)) for m in model.modules()):
                model = quantize_(model, scheme)
        elif spec.get("name") is None:
            raise FormatError("the file holds a model scn's registry does not build (saved from "
                              "a model of your own): build the same architecture afresh and pass "
                              "it, e.g. scn.load(path, model=torchvision.models.resnet18("
                              "num_classes=10)).")
        else:
            if max_scalars is not None:
                _probe(spec, max_scalars, max_modules=16 * len(shapes) + 64)
            model = quantize_(build(spec["name"], **spec["kwargs"]), scheme)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, OverflowError, AttributeError) as exc:
        raise FormatError(f"the file's header does not describe a model scn can build ({exc})") from exc
    except FormatError:
        raise
    except ScnError as exc:
        raise FormatError(f"the file's header describes a model scn cannot build: {exc}") from exc
    model.scn_reference = reference
    if "name" in spec and spec.get("name") is not None:
        model.scn_spec = spec
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
            if module.groups > 1 and module.groups == module.in_channels == module.out_channels:
                module.groups = module.weight.shape[0]  # depthwise: surgery cuts it with its input
            module.out_channels = module.weight.shape[0]
            module.in_channels = module.weight.shape[1] * module.groups
        elif isinstance(module, SCLinear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            source = module.weight if module.weight is not None else module.running_mean
            module.num_features = source.shape[0]


def save_checkpoint(model: nn.Module, path: str | Path, dataset: dict | None = None) -> None:
    header = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **describe(model, dataset)}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # In memory, then written by Python: a full disk is an OSError naming the file.
    io.write_bytes(path, container.write(st_save, state, header))


def read_header(path: str | Path) -> dict:
    """The JSON header of a model checkpoint (format and version checked; data not verified)."""
    return container.header_of(container.read_head(path), str(path), CHECKPOINT_FORMAT,
                               CHECKPOINT_VERSION)[0]


def load_checkpoint(path: str | Path, device: str = "cpu",
                    model: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model stored at `path` (its shrunk shape included); returns (model, header).
    `model`: a fresh skeleton of the architecture, for models scn's registry does not build."""
    header, raw = container.read(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
    try:
        state = {k: v.to(device) for k, v in st_load(raw).items()}
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise FormatError(f"{path}: the tensor data is unreadable ({exc}).") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise FormatError(f"{path} stores NaN or infinite values in {', '.join(bad[:3])}, which no "
                          "trained scn model holds; the file is corrupt.")
    model = rebuild(header, {k: tuple(v.shape) for k, v in state.items()},
                    max_scalars=max(1 << 24, 64 * len(raw)), skeleton=model)  # 1 scalar per 4 bytes
    try:
        load_tensors(model, state)
    except RuntimeError as exc:
        raise FormatError(f"{path}: its tensors do not fit the model its header names ({exc}).") from None
    return model.eval(), header


def input_shape(header: dict) -> tuple[int, ...] | None:
    """One input's shape (C, H, W): the dataset's, else the model's arguments, else None."""
    shape = (header.get("dataset") or {}).get("input_shape")
    if shape:
        return tuple(int(s) for s in shape)
    spec = header.get("model") or {}
    cls = MODELS.get(spec.get("name"))
    if cls is None:
        return None
    kw = {k: p.default for k, p in inspect.signature(cls).parameters.items()}
    kw.update(spec.get("kwargs") or {})
    if isinstance(kw.get("in_channels"), int) and isinstance(kw.get("image_size"), int):
        return (kw["in_channels"], kw["image_size"], kw["image_size"])
    return None
