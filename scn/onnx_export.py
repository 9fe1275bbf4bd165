"""ONNX export of a shrunk scn model, in two forms, and a check of it under onnxruntime.

- "float": every weight as float32, the graph optimized (BatchNorm folded into convolutions):
  the plainest model any runtime executes.
- "qdq": every quantized layer's weight stored as its integer codes (int4 for layers of at
  most 4 bits, two codes per byte; int8 up to 8 bits; wider layers stay float) with one
  power-of-two scale per output channel, restored by a DequantizeLinear node in front of the
  Conv/Gemm (per-axis, zero point 0); BatchNorm stays a node of its own, so the scales stay
  the channels' own 2^e. Standard runtimes (onnxruntime included) execute it as it is.

Both take the tensor the model `scn.load` returns takes (normalised images, NCHW float32) and
a batch of any size. `fold_normalization=True` puts the dataset's normalisation in front:
the graph then takes pixel values in [0, 1] (x / 255 for 8-bit images).

Exporting needs the `onnx` extra (onnx, onnxscript, onnxruntime) and torch >= 2.6.
"""

from __future__ import annotations

import contextlib
import copy
import io as _io
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scn import io
from scn.errors import ScnError
from scn.quant import SCConv2d, SCLayer, SCLinear, sc_layers

FORMS = ("float", "qdq")
INPUT, OUTPUT = "input", "logits"


def require() -> None:
    """Fail at once, before any work, when the onnx extra is missing."""
    for module in ("onnx", "onnxscript", "onnxruntime"):
        _require(module)


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise ScnError(f"ONNX export needs the {module} package: pip install 'scn[onnx]' "
                       "(onnx, onnxscript, onnxruntime).") from None


class _PlainConv(nn.Conv2d):
    """A Conv2d with the effective weight, plus the folded constant of removed inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if hasattr(self, "input_offset"):
            ones = torch.ones_like(x[:, :1])
            y = y + F.conv2d(ones, self.input_offset, None, self.stride, self.padding, self.dilation)
        return y


class _PlainLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y + self.input_offset if hasattr(self, "input_offset") else y


def _plain_layer(layer: SCLayer) -> nn.Module:
    w = layer.effective_weight().detach().float()
    if isinstance(layer, SCConv2d):
        plain = _PlainConv(w.shape[1], w.shape[0], layer.kernel_size, layer.stride, layer.padding,
                           layer.dilation, layer.groups, layer.bias is not None)
    elif isinstance(layer, SCLinear):
        plain = _PlainLinear(w.shape[1], w.shape[0], layer.bias is not None)
    else:
        raise ScnError(f"cannot export a {type(layer).__name__} layer to ONNX.")
    with torch.no_grad():
        plain.weight.copy_(w)
        if layer.bias is not None:
            plain.bias.copy_(layer.bias.detach())
    if layer.input_offset.numel():
        plain.register_buffer("input_offset", layer.input_offset.detach().float().clone())
    return plain


def plain_model(model: nn.Module) -> nn.Module:
    """A copy of `model` in plain torch layers (effective weights), same module names."""
    plain = copy.deepcopy(model).cpu().float().eval()
    for name, layer in sc_layers(plain):
        parent_name, _, child = name.rpartition(".")
        parent = plain.get_submodule(parent_name) if parent_name else plain
        if not child:
            raise ScnError("cannot export a model that is a single layer to ONNX; wrap it in a module.")
        setattr(parent, child, _plain_layer(layer))
    return plain


class _Normalized(nn.Module):
    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def _export(module: nn.Module, input_shape: tuple[int, ...], optimize: bool):
    example = torch.zeros((2, *input_shape))
    # torch.onnx prints its progress to stdout; a CLI's JSON output must stay clean.
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(_io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (example,), dynamo=True, optimize=optimize,
                                    input_names=[INPUT], output_names=[OUTPUT], verbose=False,
                                    dynamic_shapes=({0: torch.export.Dim("batch")},))
    return program.model_proto


def _strip(proto) -> None:
    """Drop the exporter's per-node provenance (source paths, stack traces: a third of a small
    model's file) and intermediate shape annotations; the computation is untouched."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del proto.graph.value_info[:]
    del proto.graph.metadata_props[:]
    del proto.metadata_props[:]


def _to_qdq(proto, model: nn.Module, prefix: str) -> None:
    """Replace each quantized layer's float weight initializer by int8 codes + DequantizeLinear."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    nodes = []
    for name, layer in sc_layers(model):
        if not layer.quantized:
            continue
        key = f"{prefix}{name}.weight" if name else f"{prefix}weight"
        if key not in inits:
            raise ScnError(f"the ONNX exporter did not keep layer {name!r}'s weight as {key!r}; "
                           "export the float form (form='float') instead.")
        bits, exps = layer.int_bits().cpu(), layer.int_exponents().cpu()
        if int(bits.max()) > 8:
            continue  # codes beyond int8 stay float
        exps = torch.where(bits > 0, exps, 0).float()
        w = layer.effective_weight().detach().cpu().float()
        scale = torch.exp2(exps)
        codes = torch.round(w / scale.view((-1,) + (1,) * (w.dim() - 1)))
        assert torch.equal(codes * scale.view((-1,) + (1,) * (w.dim() - 1)), w)
        graph.initializer.remove(inits[key])
        graph.initializer.extend([*_codes_tensors(codes.numpy().astype(np.int8), key, int(bits.max())),
                                  numpy_helper.from_array(scale.numpy().astype(np.float32), f"{key}_scale")])
        nodes.append(helper.make_node("DequantizeLinear", [f"{key}_codes", f"{key}_scale",
                                                           f"{key}_zero_point"], [key], axis=0,
                                      name=f"{key}_dequantize"))
    for node in reversed(nodes):  # ahead of every node: their inputs are initializers only
        graph.node.insert(0, node)
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, INT4_OPSET)


INT4_OPSET = 21  # the first opset whose DequantizeLinear takes int4


def _codes_tensors(codes: np.ndarray, key: str, max_bits: int) -> list:
    """The codes and zero point: int4 (two codes per byte, first in the low nibble) for layers
    of at most 4 bits, else int8."""
    from onnx import TensorProto, helper, numpy_helper

    zeros = np.zeros(codes.shape[0], np.int8)
    if max_bits > 4:
        return [numpy_helper.from_array(codes, f"{key}_codes"),
                numpy_helper.from_array(zeros, f"{key}_zero_point")]
    flat = codes.reshape(-1).astype(np.uint8) & 0x0F
    flat = np.append(flat, np.uint8(0)) if flat.size % 2 else flat
    packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
    return [helper.make_tensor(f"{key}_codes", TensorProto.INT4, codes.shape, packed, raw=True),
            helper.make_tensor(f"{key}_zero_point", TensorProto.INT4, zeros.shape,
                               bytes(-(-zeros.size // 2)), raw=True)]


def _spec_shape(model: nn.Module) -> tuple[int, ...]:
    kwargs = (getattr(model, "scn_spec", None) or {}).get("kwargs") or {}
    if "in_channels" in kwargs and "image_size" in kwargs:
        return (int(kwargs["in_channels"]), int(kwargs["image_size"]), int(kwargs["image_size"]))
    return ()


def export_onnx(model: nn.Module, path: str | Path, form: str = "qdq",
                input_shape: tuple[int, ...] | None = None, normalization: dict | None = None) -> int:
    """Write `model` (as `scn.load` returns it) to `path` as ONNX; returns the file's bytes.

    input_shape: (C, H, W); None: the one the model was built for. normalization: {"mean",
    "std"} per channel to fold in front (the graph then takes pixel values in [0, 1]).
    """
    if form not in FORMS:
        raise ScnError(f"ONNX form {form!r} is not one scn writes; pick one of {', '.join(FORMS)}.")
    for module in ("onnx", "onnxscript"):
        _require(module)
    shape = tuple(input_shape or _spec_shape(model))
    if len(shape) != 3:
        raise ScnError("export_onnx needs the model's input shape (C, H, W): pass input_shape=.")
    module: nn.Module = plain_model(model)
    prefix = ""
    if normalization:
        module, prefix = _Normalized(module, normalization["mean"], normalization["std"]), "model."
    proto = _export(module, shape, optimize=form == "float")
    _strip(proto)
    if form == "qdq":
        _to_qdq(proto, model, prefix)
        import onnx
        import onnxscript.optimizer

        # Clean the unoptimized graph's shape arithmetic; folding nothing with inputs (the
        # limits) keeps every DequantizeLinear, and so every integer weight, as it is.
        proto = onnxscript.optimizer.optimize(proto, input_size_limit=0, output_size_limit=64)
        _strip(proto)  # what the optimizer's shape inference added back
        onnx.checker.check_model(proto)
    raw = proto.SerializeToString()
    io.write_bytes(path, raw)
    return len(raw)


def compare(path: str | Path, model: nn.Module, inputs: torch.Tensor, onnx_inputs: torch.Tensor | None = None,
            batch_size: int = 500) -> dict:
    """Run scn's model on `inputs` and the ONNX file under onnxruntime on `onnx_inputs` (the same
    images as the graph takes them; default `inputs`): the share of equal predictions and the
    largest logit difference."""
    ort = _require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    equal, largest, model = 0, 0.0, model.cpu().eval()
    for start in range(0, len(inputs), batch_size):
        x = inputs[start:start + batch_size].float().contiguous()
        feed = x if onnx_inputs is None else onnx_inputs[start:start + batch_size].float().contiguous()
        theirs = torch.from_numpy(session.run([OUTPUT], {INPUT: feed.numpy()})[0])
        with torch.no_grad():
            ours = model(x)
        equal += int((theirs.argmax(1) == ours.argmax(1)).sum())
        largest = max(largest, float((theirs - ours).abs().max()))
    return {"onnx_equal_predictions": equal / len(inputs), "onnx_max_logit_diff": largest,
            "onnx_images": len(inputs)}
