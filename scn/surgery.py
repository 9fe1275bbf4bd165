"""Channel surgery: find channels whose bit depth reached 0 and take them out of the network.

`trace(model, example_input)` (scn.graph) finds the model's channel spaces; then

`prune(model, graph, physical=...)` removes every channel that is dead in *all* producers of
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

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from scn.errors import SurgeryError
from scn.graph import ChannelGraph, Read, Space, Stream, trace
from scn.quant import SCConv2d, SCLayer, sc_layers

__all__ = ["ChannelGraph", "PruneResult", "Space", "prune", "settle_norms", "shrunk_copy", "trace"]


def _constant(model: nn.Module, stream: Stream, memo: dict) -> torch.Tensor:
    """Bool per channel: the stream's value there does not depend on the model's input."""
    if id(stream) not in memo:
        parts = []
        for kind, name, *streams in stream.sources:
            dead = ~model.get_submodule(name).live_out() if kind != "product" else None
            if kind == "depthwise":  # dead itself, or fed a constant
                dead = dead | _constant(model, streams[0], memo)
            elif kind == "product":
                dead = _constant(model, streams[0], memo) & _constant(model, streams[1], memo)
            parts.append(dead)
        memo[id(stream)] = torch.stack(parts).all(0)
    return memo[id(stream)]


def _dead_channels(model: nn.Module, space: Space) -> torch.Tensor:
    """Bool per channel: constant in every stream of the space that a layer reads."""
    memo: dict = {}
    return torch.stack([_constant(model, s, memo) for s in space.streams if s.reads]).all(0)


def _columns(read: Read, channels: torch.Tensor) -> torch.Tensor:
    """The input features of `read.layer` that the given channel indices of its stream fill."""
    first = (read.offset + channels) * read.block
    return (first.view(-1, 1) + torch.arange(read.block, device=first.device)).flatten()


def _unmasked(model: nn.Module, read: Read, n: int) -> torch.Tensor:
    """Bool per channel of a space of n channels: still an input of the reading layer."""
    alive = model.get_submodule(read.layer).in_alive
    return alive[read.offset * read.block:(read.offset + n) * read.block].view(n, read.block)[:, 0]


def _to_remove(model: nn.Module, space: Space, physical: bool) -> torch.Tensor | None:
    """Channels of the space to take out now, keeping at least one (see module docstring).

    Masking takes only channels not masked before; physical removal also takes those
    (their constants were folded when they were masked).
    """
    if space.protected or not space.producers or not space.consumers:
        return None
    remove = _dead_channels(model, space).clone()
    unmasked = _unmasked(model, space.consumers[0], len(remove))
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
    names = {name for space in graph.spaces for name, _ in space.norms}
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
    """What the given dead input channels (indices into the layer's input) feed into layer
    `name`, as (values, uniform).

    values: (channels, block) for a Linear, (channels, H, W) for a conv. `inputs` holds the
    layer's input for two different model inputs: a dead channel must be the same in both,
    or the traced structure missed a path and surgery would be wrong. uniform: per channel,
    whether its image is one value everywhere (only such a channel folds exactly into a conv).
    """
    a, b = (x[0].reshape(-1, block)[channels] if x.dim() == 2 else x[0, channels] for x in inputs)
    if a.numel() and float((a - b).abs().max()) > 1e-6 * (1 + float(a.abs().max())):
        raise SurgeryError(
            f"a channel dead in every producer still varies with the input at layer {name!r}; "
            "the traced structure missed a path. Please report this model, and train it "
            "with surgery off (trainer.prune_every=0 quant=self_compress) meanwhile."
        )
    flat = a.flatten(1)
    spread = (flat - flat[:, :1]).abs().amax(1) if flat.shape[1] else flat.new_zeros(len(flat))
    return a, spread <= 1e-6 * (1 + flat.abs().amax(1) if flat.shape[1] else 1)


def _fold(layer: SCLayer, channels: torch.Tensor, block: int, values: torch.Tensor) -> None:
    """Add what the given dead input channels (indices) contribute to the layer's folded offset."""
    if not bool((values != 0).any()):
        return  # e.g. a negative BatchNorm bias through a ReLU: nothing to carry
    columns = _columns(Read("", block, 0), channels)
    w = _at_least_float32(layer.effective_weight().detach())[:, columns]
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
        if layer.groups > 1:  # depthwise: its inputs are its channels (graph.py cuts no other)
            layer.in_channels = layer.groups = len(keep)
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


class _Cuts:
    """Input features and norm entries to drop, gathered over every space before slicing: a
    concatenation's reader or norm spans several spaces, at offsets that a cut would shift."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.columns: dict[str, torch.Tensor] = {}
        self.norms: dict[str, torch.Tensor] = {}

    def _mark(self, table: dict, name: str, size: int, where: torch.Tensor) -> None:
        if name not in table:
            table[name] = torch.zeros(size, dtype=torch.bool, device=where.device)
        table[name][where] = True

    def add(self, space: Space, remove: torch.Tensor) -> None:
        channels = remove.nonzero().squeeze(1)
        for read in space.consumers:
            layer = self.model.get_submodule(read.layer)
            self._mark(self.columns, read.layer, layer.in_alive.numel(), _columns(read, channels))
        for name, offset in space.norms:
            norm = self.model.get_submodule(name)
            self._mark(self.norms, name, norm.num_features, offset + channels)

    def apply(self, physical: bool, optimizer, result: PruneResult) -> None:
        for name, drop in self.columns.items():
            layer = self.model.get_submodule(name)
            result.kept_in[name] = (~drop).nonzero().squeeze(1)
            if physical:
                _shrink_consumer(layer, result.kept_in[name], optimizer)
            else:
                layer.in_alive = layer.in_alive & ~drop
        for name, drop in self.norms.items():
            result.kept_out[name] = (~drop).nonzero().squeeze(1)
            if physical:
                _shrink_norm(self.model.get_submodule(name), result.kept_out[name], optimizer)


def _foldable(model: nn.Module, space: Space, remove: torch.Tensor, inputs: dict,
              result: PruneResult) -> torch.Tensor:
    """`remove` less the channels no conv consumer can fold exactly.

    A dead channel whose image varies at the borders (it carries an earlier fold through
    zero padding, or went through a depthwise convolution) cannot be folded into a conv as one
    value per channel: it stays, at 0 bits.
    """
    for read in space.consumers:
        layer = model.get_submodule(read.layer)
        if not isinstance(layer, SCConv2d):
            continue
        fresh = remove & _unmasked(model, read, len(remove))
        _, uniform = _dead_inputs(read.layer, inputs[read.layer],
                                  read.offset + fresh.nonzero().squeeze(1), 1)
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
    consumers = {read.layer for space, _ in plan for read in space.consumers}
    inputs = _capture_inputs(model, consumers, graph.input_shape)
    cuts = _Cuts(model)
    for space, remove in plan:
        remove = _foldable(model, space, remove, inputs, result)
        if multiple > 1 and remove.numel() >= 2 * multiple:
            remove = _to_multiple(remove, multiple)
        if remove is None or not bool(remove.any()):
            continue
        for read in space.consumers:
            fresh = remove & _unmasked(model, read, len(remove))  # masked earlier: folded already
            channels = read.offset + fresh.nonzero().squeeze(1)
            values = _dead_inputs(read.layer, inputs[read.layer], channels, read.block)[0]
            _fold(model.get_submodule(read.layer), channels, read.block, values)
        keep = (~remove).nonzero().squeeze(1)
        if physical:  # rows belong to one space: cut now; columns and norms once, at the end
            for name in space.producers:
                _shrink_producer(model.get_submodule(name), keep, optimizer)
        result.kept_out.update({name: keep for name in space.producers})
        cuts.add(space, remove)
        result.removed[space.producers[0]] = int(remove.sum())
    cuts.apply(physical, optimizer, result)
    return result


def shrunk_copy(model: nn.Module, shape: tuple[int, ...] | None) -> nn.Module:
    """A CPU copy of `model` with every removable 0-bit channel and dead input taken out.

    Uses physical channel surgery (outputs unchanged). A model surgery cannot trace is
    copied as it is: its dead channels are stored at 0 bits and its dead inputs masked.
    """
    copied = copy.deepcopy(model).cpu()
    for p in copied.parameters():
        p.grad = None
    removable = any(bool((~layer.live_out()).any() or (~layer.in_alive).any())
                    for _, layer in sc_layers(copied))
    if removable and shape is not None:  # else surgery would find nothing to do
        try:
            graph = trace(copied, torch.zeros((1, *shape)))
            prune(copied, graph, physical=True)
        except SurgeryError:
            copied = copy.deepcopy(model).cpu()
    return copied
