"""The channel graph: which channels of a converted model live and die together.

`trace(model, example_input)` reads the model's structure with torch.fx and returns a
`ChannelGraph`: its *channel spaces*. A space is a set of channels that live and die together:
the output channels of one layer, or of several layers when residual additions merge their
outputs (a ResNet stage's stream). For each space the graph knows its producers, the
BatchNorms applied to it, and its consumers (with how many input features each channel
occupies, e.g. H*W for a Linear after a flatten). Anything the tracer does not understand is a
`SurgeryError` naming the operation, never a silent guess. scn.surgery cuts along this graph.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from scn.errors import SurgeryError
from scn.quant import SCConv2d, SCLayer, SCLinear

# Modules and functions that act on each channel separately: a channel in is the same channel out.
_CHANNELWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.ELU, nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d,
)
_GLOBAL_POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_CHANNELWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, torch.sigmoid, torch.tanh,
    F.hardswish, F.elu, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
}
_CHANNELWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "relu_"}
_ADD = {operator.add, operator.iadd, torch.add}
_SCALAR_OPS = {operator.mul, operator.truediv, operator.sub, torch.mul}
_IGNORED_METHODS = {"size", "dim"}


@dataclass
class Space:
    """Channels that live and die together (see the module docstring)."""

    producers: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    consumers: list[tuple[str, int]] = field(default_factory=list)  # (layer, features/channel)
    protected: bool = False  # the model's input or output: never pruned


@dataclass
class ChannelGraph:
    spaces: list[Space]
    input_shape: tuple[int, ...]  # one example, batch dimension included (N=1)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, SCLayer | nn.modules.batchnorm._BatchNorm)
                or super().is_leaf_module(m, qualname))


class _Spaces:
    """Union-find over space ids, so residual additions can merge spaces."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.data: list[Space] = []

    def new(self, **kw) -> int:
        self.parent.append(len(self.parent))
        self.data.append(Space(**kw))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[b] = a
            sa, sb = self.data[a], self.data[b]
            sa.producers += sb.producers
            sa.norms += sb.norms
            sa.consumers += sb.consumers
            sa.protected |= sb.protected
        return a

    def get(self, i: int) -> Space:
        return self.data[self.find(i)]

    def roots(self) -> list[Space]:
        return [self.data[i] for i in range(len(self.parent)) if self.find(i) == i]


def _unsupported(node: fx.Node, what: str) -> SurgeryError:
    return SurgeryError(
        f"channel surgery cannot follow {what} at graph node {node.name!r} ({node.format_node()}). "
        "scn supports Conv2d (groups=1), Linear, BatchNorm, channel-wise activations, pooling, "
        "flatten and residual additions. Train this model with surgery off "
        "(trainer.prune_every=0), or restructure the unsupported part."
    )


def trace(model: nn.Module, example_input: torch.Tensor) -> ChannelGraph:
    """Find the model's channel spaces (see the module docstring). `model` must be converted."""
    try:
        gm = fx.GraphModule(model, _Tracer().trace(model))
    except Exception as exc:  # fx raises many kinds; the user needs one message
        raise SurgeryError(
            f"channel surgery needs to trace the model with torch.fx and that failed: {exc}. "
            "Models with data-dependent control flow cannot be traced; use surgery off "
            "(trainer.prune_every=0)."
        ) from exc
    was_training = model.training
    model.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(example_input[:1])
    model.train(was_training)

    spaces = _Spaces()
    info: dict[fx.Node, tuple[int, int | None]] = {}  # node -> (space, features per channel)
    modules = dict(model.named_modules())

    def shape(n: fx.Node) -> torch.Size:
        return n.meta["tensor_meta"].shape

    def flatten(node: fx.Node, src: fx.Node) -> None:
        space, block = info[src]
        if block is not None or len(shape(src)) < 2:
            raise _unsupported(node, "a flatten of an already flat tensor")
        in_shape, out_shape = shape(src), shape(node)
        if list(out_shape) != [in_shape[0], in_shape[1:].numel()]:
            raise _unsupported(node, f"a reshape from {list(in_shape)} to {list(out_shape)}")
        info[node] = (space, in_shape[2:].numel())

    for node in gm.graph.nodes:
        tensor_args = [a for a in node.args if isinstance(a, fx.Node) and a in info]
        if node.op == "placeholder":
            info[node] = (spaces.new(protected=True), None)
        elif node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node) or out not in info:
                raise _unsupported(node, "a model output that is not a single tensor")
            spaces.get(info[out][0]).protected = True
        elif node.op == "call_module":
            mod = modules[node.target]
            src = tensor_args[0] if tensor_args else None
            if src is None:
                raise _unsupported(node, f"module {node.target!r} without a traced input")
            space, block = info[src]
            if isinstance(mod, SCConv2d):
                if block is not None:
                    raise _unsupported(node, "a convolution of a flattened tensor")
                spaces.get(space).consumers.append((node.target, 1))
                info[node] = (spaces.new(producers=[node.target]), None)
            elif isinstance(mod, SCLinear):
                if len(shape(src)) != 2:
                    raise _unsupported(node, "a Linear on a tensor that is not (batch, features)")
                spaces.get(space).consumers.append((node.target, block or 1))
                info[node] = (spaces.new(producers=[node.target]), None)
            elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                if block is not None:
                    raise _unsupported(node, "a BatchNorm of a flattened tensor")
                spaces.get(space).norms.append(node.target)
                info[node] = (space, None)
            elif isinstance(mod, _CHANNELWISE_MODULES):
                info[node] = (space, block)
            elif isinstance(mod, _GLOBAL_POOL_MODULES):
                info[node] = (space, block)
            elif isinstance(mod, nn.Flatten):
                flatten(node, src)
            elif isinstance(mod, (nn.Conv2d, nn.Linear)):
                raise _unsupported(node, f"layer {node.target!r}, not converted by scn.quantize_")
            else:
                raise _unsupported(node, f"module {node.target!r} of type {type(mod).__name__}")
        elif node.op == "call_function":
            if node.target in _ADD and len(tensor_args) == 2:
                (sa, ba), (sb, bb) = info[tensor_args[0]], info[tensor_args[1]]
                if ba != bb or shape(tensor_args[0]) != shape(tensor_args[1]):
                    raise _unsupported(node, "an addition of tensors with different shapes")
                info[node] = (spaces.union(sa, sb), ba)
            elif (node.target in _ADD or node.target in _SCALAR_OPS) and len(tensor_args) == 1:
                info[node] = info[tensor_args[0]]  # a scalar applied to every channel alike
            elif node.target in _CHANNELWISE_FUNCTIONS and len(tensor_args) == 1:
                info[node] = info[tensor_args[0]]
            elif node.target is torch.flatten and len(tensor_args) == 1:
                flatten(node, tensor_args[0])
            elif node.target in (getattr, operator.getitem) and not tensor_args:
                pass  # shape arithmetic
            elif node.target is getattr and tensor_args and node.args[1] in ("shape",):
                pass
            else:
                raise _unsupported(node, f"function {getattr(node.target, '__name__', node.target)}")
        elif node.op == "call_method":
            src = tensor_args[0] if tensor_args else None
            if node.target in _IGNORED_METHODS:
                pass
            elif src is not None and node.target in _CHANNELWISE_METHODS:
                info[node] = info[src]
            elif src is not None and node.target in ("flatten", "view", "reshape"):
                flatten(node, src)
            elif src is not None and node.target == "mean" and len(shape(src)) == 4:
                dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
                if sorted(d % 4 for d in dims) != [2, 3]:
                    raise _unsupported(node, "a mean over other than the spatial dimensions")
                info[node] = info[src]
            else:
                raise _unsupported(node, f"method .{node.target}()")
        elif node.op == "get_attr":
            raise _unsupported(node, f"direct use of the tensor {node.target!r}")
    return ChannelGraph(spaces=spaces.roots(), input_shape=tuple(example_input[:1].shape))
