"""Models: a small CNN for 28x28 images and a CIFAR ResNet.

Plain PyTorch modules with no scn-specific code: `scn.quantize_` converts them and
`scn.surgery` traces which layer feeds which, so a user's own model works the same way.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from scn.torchvision_models import torchvision_model


def conv_bn(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(nn.Sequential):
    """Four 3x3 conv-BN-ReLU layers (two max-pools), flatten, one linear classifier.

    Width w gives channels w, 2w, 2w, 4w; `channels` (four counts) replaces them, e.g. to train
    from scratch the architecture a self-compressed run ended with. The flatten before the
    classifier is deliberate: it exercises surgery's channel-to-feature-block mapping.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16,
                 image_size: int = 28, channels: list[int] | None = None) -> None:
        if width <= 0:
            raise ValueError(f"model.width={width} must be a positive integer")
        c = [width, 2 * width, 2 * width, 4 * width] if channels is None else list(channels)
        if len(c) != 4 or any(not isinstance(n, int) or n <= 0 for n in c):
            raise ValueError(f"model.channels={channels} must be four positive integers, one per "
                             "convolution, e.g. model.channels=[16,32,32,64]")
        side = image_size // 4
        super().__init__(
            *conv_bn(in_channels, c[0]),
            *conv_bn(c[0], c[1]),
            nn.MaxPool2d(2),
            *conv_bn(c[1], c[2]),
            *conv_bn(c[2], c[3]),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c[3] * side * side, num_classes),
        )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual addition (He et al. 2016).

    When the shape changes the shortcut is a 1x1 conv-BN (option B), so every channel of the
    residual stream has a producer that surgery can shrink.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.bn1(self.conv1(x)).relu()
        out = self.bn2(self.conv2(out))
        return (out + self.shortcut(x)).relu()


class ResNet(nn.Module):
    """CIFAR ResNet: a 3x3 stem, stages of basic blocks, global average pool, linear.

    `blocks` gives the number of basic blocks per stage (ResNet-20: (3, 3, 3)); stage i has
    width * 2^i channels and halves the resolution (except the first).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 16,
                 blocks: tuple[int, ...] | list[int] = (3, 3, 3), image_size: int = 32) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"model.width={width} must be a positive integer")
        if not blocks or min(blocks) <= 0:
            raise ValueError(f"model.blocks={list(blocks)} must be a non-empty list of positive integers")
        self.stem = nn.Sequential(*conv_bn(in_channels, width))
        layers, c = [], width
        for i, n in enumerate(blocks):
            c_out = width * 2**i
            for j in range(n):
                layers.append(BasicBlock(c, c_out, stride=2 if (i > 0 and j == 0) else 1))
                c = c_out
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.head(self.pool(x).flatten(1))


class Residual(nn.Module):
    """x + f(x), with f two 3x3 conv-BN-ReLU layers (the ResNet-9 residual unit).

    `hidden` channels between the two convolutions (default: as many as the stream's).
    """

    def __init__(self, channels: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = channels if hidden is None else hidden
        self.body = nn.Sequential(*conv_bn(channels, hidden), *conv_bn(hidden, channels))

    def forward(self, x):
        return x + self.body(x)


class ResNet9(nn.Module):
    """The fast CIFAR-10 ResNet of Page's DAWNBench entry ("ResNet-9"), width-scalable.

    prep conv (w) -> conv (2w) + pool + residual -> conv (4w) + pool -> conv (8w) + pool +
    residual -> global max pool -> linear, output scaled by 1/8. w=64 is the published network
    (6.5M parameters, 94% on CIFAR-10 in about 24 epochs); smaller w for CPUs. `channels` (six
    counts: prep, layer1, layer1's residual hidden, layer2, layer3, layer3's residual hidden)
    replaces w, 2w, 2w, 4w, 8w, 8w, e.g. to train from scratch what a self-compressed run kept.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 64,
                 image_size: int = 32, channels: list[int] | None = None) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"model.width={width} must be a positive integer")
        w = width
        c = [w, 2 * w, 2 * w, 4 * w, 8 * w, 8 * w] if channels is None else list(channels)
        if len(c) != 6 or any(not isinstance(n, int) or n <= 0 for n in c):
            raise ValueError(f"model.channels={channels} must be six positive integers (prep, "
                             "layer1, its residual hidden, layer2, layer3, its residual hidden), "
                             "e.g. model.channels=[16,32,32,64,128,40]")
        self.prep = nn.Sequential(*conv_bn(in_channels, c[0]))
        self.layer1 = nn.Sequential(*conv_bn(c[0], c[1]), nn.MaxPool2d(2), Residual(c[1], c[2]))
        self.layer2 = nn.Sequential(*conv_bn(c[1], c[3]), nn.MaxPool2d(2))
        self.layer3 = nn.Sequential(*conv_bn(c[3], c[4]), nn.MaxPool2d(2), Residual(c[4], c[5]))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(c[4], num_classes, bias=False)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return self.head(self.pool(x).flatten(1)) * 0.125


MODELS: dict[str, Callable[..., nn.Module]] = {"SmallCNN": SmallCNN, "ResNet": ResNet,
                                              "ResNet9": ResNet9, "torchvision": torchvision_model}


def build(name: str, init_from: str | None = None, **kwargs) -> nn.Module:
    """Build a registered model by name and remember how, so a checkpoint can rebuild it.

    Only names in MODELS can be built: a checkpoint from a stranger names a class, it never
    brings code. `init_from`: a trained float state dict to start from (scn.init_from); the
    model's description does not record it (the trained weights are what a file holds).
    """
    from scn.errors import ConfigError

    if name not in MODELS:
        raise ConfigError(f"model.name={name!r} is not a known model; valid choices are "
                          f"{', '.join(sorted(MODELS))} (torchvision networks: model=torchvision "
                          "model.name=<builder>).")
    try:
        model = MODELS[name](**kwargs)
    except TypeError as exc:
        raise ConfigError(f"model {name} does not take these settings ({exc}); "
                          f"check the model.* keys.") from exc
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if init_from:
        from scn.init_from import load_float_state

        load_float_state(model, init_from)
    model.scn_spec = {"name": name, "kwargs": dict(kwargs)}
    return model


def build_torchvision(name: str, **kwargs) -> nn.Module:
    """`model=torchvision`: `name` is the torchvision builder (scn.torchvision_models)."""
    return build("torchvision", arch=name, **kwargs)
