"""Architectures radmark can build, one registry entry each.

An entry says how to build the network untrained, where its classifier weight lives in a state
dict (recognition reads the number of classes there, so it must be the *last* Linear) and whether
it takes the small-image stem. Adding an architecture is one :func:`register_arch` call, the way
timm's ``@register_model`` works; loading, recognition and saving read only this registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from radmark.errors import UsageError


@dataclass(frozen=True)
class Arch:
    """How to build one architecture and read its head from a state dict."""

    name: str
    build: Callable[[int, int], nn.Module]  # (num_classes, in_chans) -> untrained model
    head_key: str
    resnet_stem: bool = False  # accepts the CIFAR-style small stem (3x3 conv1, no max-pool)


ARCH_REGISTRY: dict[str, Arch] = {}


def register_arch(arch: Arch) -> Arch:
    if arch.name in ARCH_REGISTRY:
        raise ValueError(f"architecture {arch.name!r} is registered twice")
    ARCH_REGISTRY[arch.name] = arch
    return arch


def arch_names() -> tuple[str, ...]:
    return tuple(ARCH_REGISTRY)


class SmallCNN(nn.Module):
    """A tiny VGG-style CNN (32-64-128 channels, feature dim 128).

    It exists so that tests, the benchmark and CPU-only users can train and mark with a network
    that runs in milliseconds; it is not meant to be a strong classifier.
    """

    def __init__(self, num_classes: int, in_chans: int = 3) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]

        self.features = nn.Sequential(*block(in_chans, 32), *block(32, 64), *block(64, 128))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class _Residual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


class SlimResNet(nn.Module):
    """A slim residual network (24-48-96 channels, two blocks per stage, feature dim 96).

    The benchmark's second architecture for cross-architecture transfer: residual connections,
    strided convolutions instead of max-pooling and another feature dimension than SmallCNN, yet
    it trains on two CPU cores in minutes at 28-32 px.
    """

    def __init__(self, num_classes: int, in_chans: int = 3, width: int = 24) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(True)
        )
        self.layer1 = nn.Sequential(_Residual(w, w, 1), _Residual(w, w, 1))
        self.layer2 = nn.Sequential(_Residual(w, 2 * w, 2), _Residual(2 * w, 2 * w, 1))
        self.layer3 = nn.Sequential(_Residual(2 * w, 4 * w, 2), _Residual(4 * w, 4 * w, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _torchvision(name: str) -> Callable[[int, int], nn.Module]:
    def build(num_classes: int, in_chans: int) -> nn.Module:
        from torchvision.models import get_model

        model = get_model(name, weights=None, num_classes=num_classes)
        if in_chans != 3:
            _replace_first_conv(model, in_chans)
        return model

    return build


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    return None


def _replace_first_conv(model: nn.Module, in_chans: int) -> None:
    found = first_conv(model)
    assert found is not None  # every registered torchvision arch starts with a convolution
    name, conv = found
    new = nn.Conv2d(
        in_chans,
        conv.out_channels,
        kernel_size=conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


for _name, _head in (
    ("resnet18", "fc.weight"),
    ("resnet34", "fc.weight"),
    ("resnet50", "fc.weight"),
    ("vgg11_bn", "classifier.6.weight"),
    ("vgg16", "classifier.6.weight"),
    ("mobilenet_v2", "classifier.1.weight"),
    ("mobilenet_v3_small", "classifier.3.weight"),
    ("efficientnet_b0", "classifier.1.weight"),
    ("densenet121", "classifier.weight"),
    ("vit_b_16", "heads.head.weight"),
):
    register_arch(Arch(_name, _torchvision(_name), _head, resnet_stem=_name.startswith("resnet")))
register_arch(Arch("smallcnn", lambda c, ch: SmallCNN(c, in_chans=ch), "fc.weight"))
register_arch(Arch("slimresnet", lambda c, ch: SlimResNet(c, in_chans=ch), "fc.weight"))


def get_arch(name: str) -> Arch:
    try:
        return ARCH_REGISTRY[name]
    except KeyError:
        raise UsageError(
            f"unknown architecture {name!r}; use one of: {', '.join(ARCH_REGISTRY)}"
        ) from None


def build_model(
    arch: str, num_classes: int, *, small_stem: bool = False, in_chans: int = 3
) -> nn.Module:
    """Build an untrained ``arch`` with ``num_classes`` outputs (never downloads weights).

    ``small_stem`` gives ResNets the CIFAR-style stem (3x3 stride-1 conv1, no max-pool) that small
    images need to keep any spatial resolution; it is refused for other architectures rather than
    silently ignored, because a state dict saved with it would then fail to reload. ``in_chans``
    replaces the first convolution, so grayscale datasets can be trained natively.
    """
    entry = get_arch(arch)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise UsageError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(in_chans, int) or isinstance(in_chans, bool) or in_chans < 1:
        raise UsageError(f"in_chans must be a positive integer, got {in_chans!r}")
    if small_stem and not entry.resnet_stem:
        raise UsageError(
            f"--small-stem only applies to ResNets, not {arch}; drop it or pick a resnet"
        )
    model = entry.build(num_classes, 3 if small_stem else in_chans)
    if small_stem:
        model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model
