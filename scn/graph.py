"""The channel graph: which channels of a converted model live and die together.

`trace(model, example_input)` reads the model's structure with torch.fx and returns a
`ChannelGraph` of *spaces*: sets of channels that are removed together because every tensor they
pass through indexes them alike. A space is made of *streams*, the tensors of its channels, each
knowing what makes its values (its sources) and which layers read it:

- a layer's output is a stream whose source is the layer; residual additions merge streams
  (the sum is constant only where every addend is);
- a depthwise convolution (groups = in = out channels) maps channel i of its input to channel i
  of its output: both streams join one space, and the output is constant where the layer is dead
  or its input constant;
- a channel-wise product (a squeeze-and-excitation gate) joins its factors' space; it is
  constant where both factors are;
- a concatenation is made of its parts: its readers read each part's stream at an offset;
- channel shuffles, chunks, other reshapes and grouped convolutions fix the channel counts of
  what they read and write (a cut would change their meaning): those spaces are *protected*,
  like the model's input and output, and are never cut.

A space's channel can go when every stream of it that something reads (a layer's input columns,
the model's output) is constant there: scn.surgery measures the constant and folds it into the
readers. Anything the tracer does not understand is a `SurgeryError` naming the operation and
the node, never a guess. The graph also knows each layer's output positions per example.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from scn.errors import SurgeryError
from scn.quant import SCConv2d, SCLayer, SCLinear

try:  # torchvision's drop-path: the identity in eval mode, a per-sample scale in training
    from torchvision.ops import StochasticDepth
except ImportError:  # pragma: no cover (torchvision is a dependency)
    StochasticDepth = ()

# Modules and functions that act on each channel separately: a channel in is the same channel out.
_CHANNELWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Mish, nn.ELU, nn.PReLU, nn.Identity, nn.Dropout, nn.Dropout2d,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)
_CHANNELWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, torch.sigmoid, torch.tanh,
    F.hardswish, F.hardsigmoid, F.elu, F.dropout, F.max_pool2d, F.avg_pool2d,
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.nn.functional.mish,
}
_CHANNELWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone"}
_ADD = {operator.add, operator.iadd, torch.add}
_MUL = {operator.mul, operator.imul, torch.mul}
_SCALAR_OPS = {*_MUL, operator.truediv, operator.sub, operator.isub}
_PINNING_METHODS = {"view", "reshape", "transpose", "permute", "chunk", "split", "unflatten"}
_PINNING_FUNCTIONS = {torch.transpose, torch.permute, torch.chunk, torch.split, torch.reshape,
                      operator.getitem}
_IGNORED_METHODS = {"size", "dim"}

class Read(NamedTuple):
    """A layer reading a stream: channel i fills its input features
    (offset + i) * block ... (offset + i + 1) * block (block = H*W after a flatten, else 1)."""

    layer: str
    block: int
    offset: int


@dataclass(eq=False)
class Stream:
    """One tensor of a space: what makes its values and who reads them."""

    # ("layer", name) | ("depthwise", name, input stream) | ("product", stream, stream)
    sources: list[tuple] = field(default_factory=list)
    reads: list[Read] = field(default_factory=list)
    protected: bool = False  # the model's input or output, or a fixed channel count


@dataclass
class Space:
    """Channels removed together (see the module docstring)."""

    streams: list[Stream]
    producers: list[str]  # layers whose output channels these are (depthwise ones included)
    norms: list[tuple[str, int]]  # (BatchNorm, offset of the space's channels in it)
    consumers: list[Read]  # every layer reading the space's channels as input features
    protected: bool = False


@dataclass
class ChannelGraph:  # what trace returns
    spaces: list[Space]
    input_shape: tuple[int, ...]  # one example, batch dimension included (N=1)
    positions: dict[str, int] = field(default_factory=dict)  # per layer: outputs per channel


@dataclass
class _Layout:
    """A traced tensor's channels: parts (stream id, channels) in order; block after a flatten."""

    parts: list[tuple[int, int]]
    block: int | None = None


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, SCLayer | nn.modules.batchnorm._BatchNorm)
                or (bool(StochasticDepth) and isinstance(m, StochasticDepth))
                or super().is_leaf_module(m, qualname))


class _Find:  # union-find over ids
    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        self.parent[b] = a
        return a


class _Builder:
    """Streams as they are traced: `same` merges streams (additions), `joint` merges spaces."""

    def __init__(self) -> None:
        self.streams: list[Stream] = []
        self.norms: list[list[tuple[str, int]]] = []
        self.same, self.joint = _Find(), _Find()

    def new(self, *sources: tuple, protected: bool = False) -> int:
        self.streams.append(Stream(list(sources), protected=protected))
        self.norms.append([])
        self.same.add()
        return self.joint.add()

    def get(self, i: int) -> Stream:
        return self.streams[self.same.find(i)]

    def merge(self, a: int, b: int) -> int:
        a, b = self.same.find(a), self.same.find(b)
        if a != b:
            sa, sb = self.streams[a], self.streams[b]
            sa.sources, sa.reads = sa.sources + sb.sources, sa.reads + sb.reads
            sa.protected |= sb.protected
            self.norms[a] += self.norms[b]
            self.same.union(a, b)
        self.joint.union(a, b)
        return a

    def protect(self, layout: _Layout) -> None:
        for s, _ in layout.parts:
            self.get(s).protected = True

    def spaces(self) -> list[Space]:
        roots = [i for i in range(len(self.streams)) if self.same.find(i) == i]
        for i in roots:  # sources name streams by id until here
            stream = self.streams[i]
            stream.sources = [src if src[0] == "layer" else (*src[:2], *map(self.get, src[2:]))
                              for src in stream.sources]
        groups: dict[int, list[int]] = {}
        for i in roots:
            groups.setdefault(self.joint.find(i), []).append(i)
        out = []
        for members in groups.values():
            streams = [self.streams[i] for i in members]
            producers = [src[1] for s in streams for src in s.sources if src[0] != "product"]
            out.append(Space(streams, producers, [n for i in members for n in self.norms[i]],
                             [r for s in streams for r in s.reads], any(s.protected for s in streams)))
        return out


def _unsupported(node: fx.Node, what: str) -> SurgeryError:
    return SurgeryError(
        f"channel surgery cannot follow {what} at graph node {node.name!r} ({node.format_node()}). "
        "scn follows Conv2d (grouped and depthwise too), Linear, BatchNorm, channel-wise "
        "activations and pooling, flatten, spatial means, residual additions, concatenation, "
        "channel-wise products and channel shuffles. Train this model with surgery off "
        "(trainer.prune_every=0 quant=self_compress), or restructure the unsupported part."
    )


def _graph_module(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.GraphModule(model, _Tracer().trace(model))
    except Exception as exc:  # fx raises many kinds; the user needs one message
        raise SurgeryError(
            f"channel surgery needs to trace the model with torch.fx and that failed: {exc}. "
            "Models with data-dependent control flow cannot be traced; use surgery off "
            "(trainer.prune_every=0 quant=self_compress)."
        ) from exc


def _nodes_in(args) -> list[fx.Node]:
    """Every fx node in (nested lists, tuples and dicts of) arguments, in order."""
    found: list[fx.Node] = []
    fx.node.map_arg(args, found.append)
    return found


def trace(model: nn.Module, example_input: torch.Tensor) -> ChannelGraph:
    """Find the model's channel spaces (see the module docstring). `model` must be converted."""
    gm = _graph_module(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input[:1])
    finally:
        model.train(was_training)
    walk = _Walk(gm, dict(model.named_modules()))
    positions: dict[str, int] = {}
    for node in gm.graph.nodes:
        walk.visit(node)
        if node.op == "call_module" and isinstance(walk.modules[node.target], SCLayer):
            positions[node.target] = positions.get(node.target, 0) + math.prod(_shape(node)[2:])
    return ChannelGraph(walk.b.spaces(), tuple(example_input[:1].shape), positions)


def _shape(n: fx.Node) -> torch.Size | None:
    meta = n.meta.get("tensor_meta")
    return getattr(meta, "shape", None)


class _Walk:
    """One pass over the fx graph, node by node, building the streams."""

    def __init__(self, gm: fx.GraphModule, modules: dict[str, nn.Module]) -> None:
        self.b = _Builder()
        self.info: dict[fx.Node, _Layout] = {}
        self.modules = modules

    def fresh(self, node: fx.Node, *sources: tuple, protected: bool = False) -> _Layout:
        shape = _shape(node)
        channels = int(shape[1]) if shape is not None and len(shape) >= 2 else 0
        return _Layout([(self.b.new(*sources, protected=protected), channels)])

    def pinned(self, node: fx.Node, *layouts: _Layout) -> _Layout:
        """What a shape-fixing operation reads stays whole; what it returns is a new stream."""
        for layout in layouts:
            self.b.protect(layout)
        return self.fresh(node, protected=True)

    def read(self, layout: _Layout, layer: str, block: int) -> None:
        offset = 0
        for s, n in layout.parts:
            self.b.get(s).reads.append(Read(layer, block, offset))
            offset += n

    def visit(self, node: fx.Node) -> None:
        tensors = [a for a in _nodes_in(node.args) + _nodes_in(node.kwargs) if a in self.info]
        if node.op == "placeholder":
            self.info[node] = self.fresh(node, protected=True)
        elif node.op == "output":
            outs = _nodes_in([node.args[0]])
            if not outs or any(o not in self.info for o in outs):
                raise _unsupported(node, "a model output that is not made of tensors")
            for o in outs:
                self.b.protect(self.info[o])
        elif node.op == "get_attr":
            raise _unsupported(node, f"direct use of the tensor {node.target!r}")
        elif not tensors:
            return  # shape arithmetic (x.size(), sizes, constants)
        else:
            layout = (self.module(node, self.modules[node.target], tensors[0])
                      if node.op == "call_module" else self.function(node, tensors)
                      if node.op == "call_function" else self.method(node, tensors))
            if layout is not None:
                self.info[node] = layout

    def module(self, node: fx.Node, mod: nn.Module, src: fx.Node) -> _Layout:
        layout = self.info[src]
        if isinstance(mod, SCConv2d):
            return self.conv(node, mod, layout)
        if isinstance(mod, SCLinear):
            if len(_shape(src)) != 2:
                raise _unsupported(node, "a Linear on a tensor that is not (batch, features)")
            self.read(layout, node.target, layout.block or 1)
            return self.fresh(node, ("layer", node.target))
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            if layout.block is not None:
                raise _unsupported(node, "a BatchNorm of a flattened tensor")
            offset = 0
            for s, n in layout.parts:
                self.b.norms[self.b.same.find(s)].append((node.target, offset))
                offset += n
            return layout
        if isinstance(mod, _CHANNELWISE_MODULES) or (StochasticDepth and isinstance(mod, StochasticDepth)):
            return layout
        if isinstance(mod, nn.Flatten):
            return self.flatten(node, src)
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            raise _unsupported(node, f"layer {node.target!r}, not converted by scn.quantize_")
        raise _unsupported(node, f"module {node.target!r} of type {type(mod).__name__}")

    def conv(self, node: fx.Node, mod: SCConv2d, layout: _Layout) -> _Layout:
        if layout.block is not None:
            raise _unsupported(node, "a convolution of a flattened tensor")
        if mod.groups == 1:
            self.read(layout, node.target, 1)
            return self.fresh(node, ("layer", node.target))
        if mod.groups == mod.in_channels == mod.out_channels and len(layout.parts) == 1:
            (s, _), = layout.parts
            out = self.fresh(node, ("depthwise", node.target, s))
            self.b.joint.union(s, out.parts[0][0])
            return out
        # Grouped: a cut must keep every group the same size, so its channels stay.
        self.b.protect(layout)
        return self.fresh(node, ("layer", node.target), protected=True)

    def flatten(self, node: fx.Node, src: fx.Node) -> _Layout:
        layout, in_shape, out_shape = self.info[src], _shape(src), _shape(node)
        if layout.block is not None or len(in_shape) < 2:
            raise _unsupported(node, "a flatten of an already flat tensor")
        if list(out_shape) != [in_shape[0], in_shape[1:].numel()]:
            return self.pinned(node, layout)  # a reshape that regroups channels
        return _Layout(layout.parts, in_shape[2:].numel())

    def function(self, node: fx.Node, tensors: list[fx.Node]) -> _Layout | None:
        target, layouts = node.target, [self.info[t] for t in tensors]
        if target in _ADD and len(tensors) == 2:
            return self.add(node, tensors)
        if target in _MUL and len(tensors) == 2:
            return self.product(node, tensors)
        if target in _SCALAR_OPS | _ADD and len(tensors) == 1:
            if any(a not in self.info and _shape(a) is not None for a in _nodes_in(node.args)):
                raise _unsupported(node, "an operation with a tensor made inside the model")
            return layouts[0]  # a scalar applied to every channel alike
        if target in _CHANNELWISE_FUNCTIONS and len(tensors) == 1:
            return layouts[0]
        if target is torch.flatten and len(tensors) == 1:
            return self.flatten(node, tensors[0])
        if target is torch.cat:
            return self.cat(node, tensors, layouts)
        if target is getattr:
            return None  # x.shape: followed by shape arithmetic only
        if target in _PINNING_FUNCTIONS:
            return self.pinned(node, *layouts)
        raise _unsupported(node, f"function {getattr(target, '__name__', target)}")

    def method(self, node: fx.Node, tensors: list[fx.Node]) -> _Layout | None:
        src, name = tensors[0], node.target
        if name in _IGNORED_METHODS:
            return None  # x.size(): shape arithmetic
        if name in _CHANNELWISE_METHODS and len(tensors) == 1:
            return self.info[src]
        if name in ("flatten", "view", "reshape") and len(tensors) == 1 and len(_shape(src)) == 4:
            return self.flatten(node, src)
        if name == "mean" and len(tensors) == 1 and len(_shape(src)) == 4:
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = [dims] if isinstance(dims, int) else list(dims or [])
            if sorted(d % 4 for d in dims) != [2, 3]:
                raise _unsupported(node, "a mean over other than the spatial dimensions")
            return self.info[src]
        if name in _PINNING_METHODS:
            return self.pinned(node, *(self.info[t] for t in tensors))
        raise _unsupported(node, f"method .{name}()")

    def add(self, node: fx.Node, tensors: list[fx.Node]) -> _Layout:
        a, b = (self.info[t] for t in tensors)
        if a.block != b.block or _shape(tensors[0]) != _shape(tensors[1]):
            raise _unsupported(node, "an addition of tensors with different shapes")
        if [n for _, n in a.parts] != [n for _, n in b.parts]:
            return self.pinned(node, a, b)  # parts that do not line up: keep them whole
        pairs = zip(a.parts, b.parts, strict=True)
        return _Layout([(self.b.merge(sa, sb), n) for (sa, n), (sb, _) in pairs], a.block)

    def product(self, node: fx.Node, tensors: list[fx.Node]) -> _Layout:
        (a, b), shapes = (self.info[t] for t in tensors), [_shape(t) for t in tensors]
        if len(a.parts) != 1 or len(b.parts) != 1 or a.block or b.block:
            return self.pinned(node, a, b)
        if len(shapes[0]) != 4 or len(shapes[1]) != 4 or shapes[0][1] != shapes[1][1]:
            raise _unsupported(node, "a product of tensors whose channels do not line up")
        sa, sb = a.parts[0][0], b.parts[0][0]
        out = self.fresh(node, ("product", node.name, sa, sb))
        for s in (sa, sb):
            self.b.joint.union(s, out.parts[0][0])
        return out

    def cat(self, node: fx.Node, tensors: list[fx.Node], layouts: list[_Layout]) -> _Layout:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        rank = len(_shape(node))
        if dim % rank != 1 or any(layout.block is not None for layout in layouts):
            raise _unsupported(node, "a concatenation along other than the channel dimension")
        return _Layout([p for layout in layouts for p in layout.parts])
