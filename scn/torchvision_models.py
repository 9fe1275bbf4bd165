"""torchvision's classification networks as scn models: `model=torchvision model.name=<builder>`.

`torchvision_model(arch, ...)` builds `torchvision.models.get_model(arch, weights=None,
num_classes=...)` and adapts its stem to the dataset: the first convolution takes the
dataset's input channels, and with `small_input` it keeps full resolution (stride 1, and the
max-pool right after it becomes the identity), which is what 28x28 or 32x32 images need; the
224x224 stems downsample such an image 4x before the first block. Only names torchvision
lists as classification builders are built, so a file naming one never brings code.
"""

from __future__ import annotations

from torch import nn

from scn.errors import ConfigError

# Builders whose default has auxiliary classifier outputs (a tuple in training): scn trains one
# output, so they are built without them.
BUILDER_KWARGS = {a: {"aux_logits": False, "init_weights": True} for a in ("googlenet", "inception_v3")}


def classification_builders() -> list[str]:
    import torchvision.models as tvm

    return tvm.list_models(module=tvm)


def torchvision_model(arch: str, in_channels: int = 3, num_classes: int = 10,
                      image_size: int = 224, small_input: bool = False) -> nn.Module:
    """A freshly initialised torchvision classifier with its stem adapted (module docstring)."""
    import torchvision.models as tvm

    known = classification_builders()
    if arch not in known:
        raise ConfigError(f"model.name={arch!r} is not a torchvision classification builder; "
                          f"choose one of {', '.join(known)}.")
    model = tvm.get_model(arch, weights=None, num_classes=num_classes, **BUILDER_KWARGS.get(arch, {}))
    _adapt_stem(model, in_channels, small_input)
    return model


def _adapt_stem(model: nn.Module, in_channels: int, small_input: bool) -> None:
    convs_seen = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d):
                convs_seen += 1
                if convs_seen == 1:
                    setattr(parent, child_name, _stem_conv(child, in_channels, small_input))
            elif small_input and convs_seen == 1 and isinstance(child, nn.MaxPool2d):
                setattr(parent, child_name, nn.Identity())
                return


def _stem_conv(conv: nn.Conv2d, in_channels: int, small_input: bool) -> nn.Conv2d:
    if in_channels == conv.in_channels and not small_input:
        return conv
    if conv.groups != 1:
        raise ConfigError("this network's first convolution is grouped; scn cannot adapt its stem.")
    return nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size,
                     stride=1 if small_input else conv.stride, padding=conv.padding,
                     dilation=conv.dilation, bias=conv.bias is not None,
                     padding_mode=conv.padding_mode)
