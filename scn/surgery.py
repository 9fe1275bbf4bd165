"""Channel surgery: find channels whose bit depth reached 0 and take them out of the network.

Two steps, both usable on their own:

1. `trace(model, example_input)` reads the model's structure with torch.fx and returns a
   `ChannelGraph`: its *channel spaces*. A space is a set of channels that live and die
   together: the output channels of one layer, or of several layers when residual additions
   merge their outputs (a ResNet stage's stream). For each space the graph knows its
   producers, the BatchNorms applied to it, and its consumers (with how many input features
   each channel occupies, e.g. H*W for a Linear after a flatten). Anything the tracer does not
   understand is a `SurgeryError` naming the operation, never a silent guess.

2. `prune(model, graph, physical=...)` removes every channel that is dead in *all* producers of
   its space (a residual-stream channel still fed by one live block stays, at 0 bits in the
   blocks where it is dead). A dead channel's weights are zero, but it can still emit an
   input-independent value (a BatchNorm bias through a ReLU); that value is measured by a
   forward pass and folded exactly into each consumer (`SCLayer.input_offset`), so the
   network's eval-mode outputs do not change. With `physical=True` the producers' rows, their
   BatchNorm entries and the consumers' input columns are sliced away, in place, together with
   the optimizer's per-parameter state; with `physical=False` consumers only mask the inputs
   (the same function, no speed-up: the "masked" baseline).

A space is never emptied: when every channel of it is dead, the one with the largest bit
depth stays (at 0 bits it costs nothing but its float parameters), so the network keeps a
valid shape and a constant output where the layer died.
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
        return isinstance(m, SCLayer) or super().is_leaf_module(m, qualname)


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


def _dead_channels(model: nn.Module, space: Space) -> torch.Tensor:
    """Bool per channel: dead in every producer of the space."""
    dead = None
    for name in space.producers:
        layer_dead = ~model.get_submodule(name).live_out()
        dead = layer_dead if dead is None else dead & layer_dead
    return dead


def _to_remove(model: nn.Module, space: Space, physical: bool) -> torch.Tensor | None:
    """Channels of the space to take out now, keeping at least one (see module docstring).

    Masking takes only channels not masked before; physical removal also takes those
    (their constants were folded when they were masked).
    """
    if space.protected or not space.producers or not space.consumers:
        return None
    remove = _dead_channels(model, space).clone()
    first, block = space.consumers[0]
    unmasked = model.get_submodule(first).in_alive.view(-1, block)[:, 0]
    if not physical:
        remove &= unmasked
    if not bool(remove.any()):
        return None
    if bool(remove.all()) or not bool((unmasked & ~remove).any()):
        bits = torch.stack([model.get_submodule(n).b.detach() for n in space.producers
                            if model.get_submodule(n).quantized]).amax(0)
        bits = torch.where(unmasked, bits, torch.full_like(bits, -float("inf")))
        remove[int(bits.argmax())] = False  # the last channel stays, at 0 bits
    return remove if bool(remove.any()) else None


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _capture_inputs(model: nn.Module, names: set[str], input_shape) -> dict:
    """Each named layer's input for two different model inputs (zeros and noise), eval mode."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: seen[n].append(_at_least_float32(args[0].detach()))) for n in names]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            param = next(model.parameters())  # probe on its device, in its dtype (float64 too)
            for x in (torch.zeros(input_shape), torch.randn(input_shape, generator=gen)):
                model(x.to(param.device, param.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return seen


def settle_norms(model: nn.Module, graph: ChannelGraph) -> int:
    """Align the running mean of every BatchNorm channel whose input is constant with it.

    A dead producer feeds its BatchNorm a constant. In training the BatchNorm then outputs
    exactly its bias (batch mean = the constant, batch variance 0), but its running statistics
    still remember the live channel and fade only slowly, so in eval mode it outputs something
    else: evaluations right after a death go wrong, and a fold would carry a value training
    never saw. With the running mean set to the constant, eval mode agrees with training.
    Returns the number of channels changed. Call it before `prune` and before evaluating.
    """
    names = {name for space in graph.spaces for name in space.norms}
    if not names:
        return 0
    inputs = _capture_inputs(model, names, graph.input_shape)
    changed = 0
    for name in names:
        a, b = (x[0].flatten(1) for x in inputs[name])  # (channels, positions)
        tol = 1e-6 * (1 + a.abs().amax(1))
        constant = ((a - b).abs().amax(1) <= tol) & ((a - a[:, :1]).abs().amax(1) <= tol)
        if not bool(constant.any()):
            continue
        norm = model.get_submodule(name)
        value = a[:, 0].to(norm.running_mean.dtype)
        stale = constant & (norm.running_mean != value)
        norm.running_mean[stale] = value[stale]
        changed += int(stale.sum())
    return changed


def _dead_inputs(name: str, inputs, channels: torch.Tensor, block: int):
    """What the given dead channels feed into layer `name`, as (values, uniform).

    values: (channels, block) for a Linear, (channels, H, W) for a conv. `inputs` holds the
    layer's input for two different model inputs: a dead channel must be the same in both,
    or the traced structure missed a path and surgery would be wrong. uniform: per channel,
    whether its image is one value everywhere (only such a channel folds exactly into a conv).
    """
    a, b = (x[0].reshape(len(channels), block, *x.shape[2:])[channels] if x.dim() == 2
            else x[0, channels] for x in inputs)
    if a.numel() and float((a - b).abs().max()) > 1e-6 * (1 + float(a.abs().max())):
        raise SurgeryError(
            f"a channel dead in every producer still varies with the input at layer {name!r}; "
            "the traced structure missed a path. Please report this model, and train it "
            "with surgery off (trainer.prune_every=0) meanwhile."
        )
    flat = a.flatten(1)
    spread = (flat - flat[:, :1]).abs().amax(1) if flat.shape[1] else flat.new_zeros(len(flat))
    return a, spread <= 1e-6 * (1 + flat.abs().amax(1) if flat.shape[1] else 1)


def _fold(layer: SCLayer, channels: torch.Tensor, block: int, values: torch.Tensor) -> None:
    """Add what the given dead input channels contribute to the layer's folded offset."""
    if not bool((values != 0).any()):
        return  # e.g. a negative BatchNorm bias through a ReLU: nothing to carry
    w = _at_least_float32(layer.effective_weight().detach())[:, channels.repeat_interleave(block)]
    if isinstance(layer, SCConv2d):  # uniform images: one value per channel
        contrib = torch.einsum("oihw,i->ohw", w, values.flatten(1)[:, 0]).unsqueeze(1)
    else:
        contrib = w @ values.flatten()
    contrib = contrib.to(layer.weight.dtype)
    layer.input_offset = contrib if layer.input_offset.numel() == 0 else layer.input_offset + contrib


def _slice_param(p: torch.Tensor, dim: int, keep: torch.Tensor, optimizer) -> None:
    """Slice a parameter or buffer in place (same object), and its optimizer state."""
    old_shape = p.shape
    p.data = p.data.index_select(dim, keep)
    if isinstance(p, nn.Parameter):
        if p.grad is not None:
            p.grad = p.grad.index_select(dim, keep)
        if optimizer is not None and p in optimizer.state:
            state = optimizer.state[p]
            for k, v in state.items():
                if torch.is_tensor(v) and v.shape == old_shape:
                    state[k] = v.index_select(dim, keep)


def _shrink_producer(layer: SCLayer, keep: torch.Tensor, optimizer) -> None:
    for p in (layer.weight, layer.bias, layer.b, layer.e):
        if p is not None:
            _slice_param(p, 0, keep, optimizer)
    if layer.input_offset.numel():
        layer.input_offset = layer.input_offset.index_select(0, keep)
    if isinstance(layer, SCConv2d):
        layer.out_channels = len(keep)
    else:
        layer.out_features = len(keep)


def _shrink_consumer(layer: SCLayer, keep_f: torch.Tensor, optimizer) -> None:
    _slice_param(layer.weight, 1, keep_f, optimizer)
    layer.in_alive = layer.in_alive.index_select(0, keep_f)
    if isinstance(layer, SCConv2d):
        layer.in_channels = len(keep_f)
    else:
        layer.in_features = len(keep_f)


def _shrink_norm(norm: nn.Module, keep: torch.Tensor, optimizer) -> None:
    for t in (norm.weight, norm.bias, norm.running_mean, norm.running_var):
        if t is not None:
            _slice_param(t, 0, keep, optimizer)
    norm.num_features = len(keep)


@dataclass
class PruneResult:
    removed: dict[str, int]  # first producer of each pruned space -> channels taken out
    # Indices kept, for mapping old tensors to new: producers and norms (rows), consumers (inputs).
    kept_out: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    kept_in: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    kept_nonuniform: int = 0  # dead channels left in place: their image cannot fold exactly

    @property
    def total(self) -> int:
        return sum(self.removed.values())


def _remove(model: nn.Module, space: Space, remove: torch.Tensor, physical: bool, optimizer,
            result: PruneResult) -> None:
    keep = (~remove).nonzero().squeeze(1)
    result.kept_out.update({name: keep for name in space.producers + space.norms})
    for name, block in space.consumers:
        result.kept_in[name] = (~remove.repeat_interleave(block)).nonzero().squeeze(1)
    if not physical:
        for name, block in space.consumers:
            layer = model.get_submodule(name)
            layer.in_alive = layer.in_alive & ~remove.repeat_interleave(block)
        return
    for name in space.producers:
        _shrink_producer(model.get_submodule(name), keep, optimizer)
    for name in space.norms:
        _shrink_norm(model.get_submodule(name), keep, optimizer)
    for name, _ in space.consumers:
        _shrink_consumer(model.get_submodule(name), result.kept_in[name], optimizer)


def _foldable(model: nn.Module, space: Space, remove: torch.Tensor, inputs: dict,
              result: PruneResult) -> torch.Tensor:
    """`remove` less the channels no conv consumer can fold exactly.

    A dead channel whose image varies at the borders (it carries an earlier fold through
    zero padding) cannot be folded into a conv as one value per channel: it stays, at 0 bits.
    """
    for name, block in space.consumers:
        layer = model.get_submodule(name)
        if not isinstance(layer, SCConv2d):
            continue
        fresh = remove & layer.in_alive.view(-1, block)[:, 0]
        _, uniform = _dead_inputs(name, inputs[name], fresh, block)
        if not bool(uniform.all()):
            remove = remove.clone()
            remove[fresh.nonzero().squeeze(1)[~uniform]] = False
            result.kept_nonuniform += int((~uniform).sum())
    return remove


def _to_multiple(remove: torch.Tensor, multiple: int) -> torch.Tensor | None:
    """`remove` cut down so that the channels left are a multiple of `multiple` (the rest of
    the dead stay in, masked at 0 bits), or None when nothing can go yet."""
    n, c = int(remove.sum()), remove.numel()
    take = n - (n - c) % multiple  # the most dead channels whose removal leaves c - take aligned
    if take <= 0:
        return None
    remove = remove.clone()
    remove[remove.nonzero().squeeze(1)[: n - take]] = False
    return remove


def prune(model: nn.Module, graph: ChannelGraph, physical: bool = True,
          optimizer: torch.optim.Optimizer | None = None, multiple: int = 1) -> PruneResult:
    """Remove (or, with physical=False, mask) every channel dead in all its producers.

    Eval-mode outputs are unchanged (dead channels' constant outputs are folded into their
    consumers). With an optimizer, its per-parameter state is sliced alongside.

    `multiple` > 1 removes channels only in numbers that leave each space a multiple of it
    (dead channels beyond that are masked, at 0 bits): convolution kernels run at full speed
    on channel counts that fill their vector registers (8 float32 lanes on AVX2, 16 on
    AVX-512, 8 for tensor cores), and a layer cut from 48 to 46 channels can be slower than
    at 48. Spaces narrower than twice the multiple are cut channel by channel.
    """
    if physical and multiple > 1:
        masked = _prune(model, graph, False, None, 1)  # fold and mask every dead channel first
        result = _prune(model, graph, True, optimizer, multiple)
        for name, n in masked.removed.items():  # total: channels masked or removed by this call
            result.removed[name] = max(n, result.removed.get(name, 0))
        result.kept_nonuniform += masked.kept_nonuniform
        return result
    return _prune(model, graph, physical, optimizer, 1)


def _prune(model: nn.Module, graph: ChannelGraph, physical: bool,
           optimizer: torch.optim.Optimizer | None, multiple: int) -> PruneResult:
    plan = []
    for space in graph.spaces:
        remove = _to_remove(model, space, physical)
        if remove is not None:
            plan.append((space, remove))
    result = PruneResult({})
    if not plan:
        return result
    consumers = {name for space, _ in plan for name, _ in space.consumers}
    inputs = _capture_inputs(model, consumers, graph.input_shape)

    for space, remove in plan:
        remove = _foldable(model, space, remove, inputs, result)
        if multiple > 1 and remove.numel() >= 2 * multiple:
            remove = _to_multiple(remove, multiple)
        if remove is None or not bool(remove.any()):
            continue
        for name, block in space.consumers:
            layer = model.get_submodule(name)
            fresh = remove & layer.in_alive.view(-1, block)[:, 0]  # masked earlier: folded already
            _fold(layer, fresh, block, _dead_inputs(name, inputs[name], fresh, block)[0])
        _remove(model, space, remove, physical, optimizer, result)
        result.removed[space.producers[0]] = int(remove.sum())
    return result
