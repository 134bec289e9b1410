"""Feature extractors, registered by name.

Each registered constructor takes ``in_chans`` plus its own keyword options and
returns ``(module, feature_dim)``; the module maps a normalised float image batch
to a ``(B, feature_dim)`` feature batch.
"""
from __future__ import annotations

import torch
from torch import nn

from semifer.registry import BACKBONES


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


@BACKBONES.register("small_cnn")
def small_cnn(in_chans: int = 3, width: int = 32, dropout: float = 0.0) -> tuple[nn.Module, int]:
    """Four conv stages (two 3x3 conv-BN-ReLU each, width doubling), for 48-64 px faces on CPUs."""
    widths = [width, width * 2, width * 4, width * 8]
    layers: list[nn.Module] = []
    cin = in_chans
    for i, w in enumerate(widths):
        layers += [_conv_bn(cin, w), _conv_bn(w, w)]
        if i < len(widths) - 1:
            layers.append(nn.MaxPool2d(2))
        cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers), widths[-1]


def _torchvision_resnet(name: str, in_chans: int, small_input: bool) -> tuple[nn.Module, int]:
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    if in_chans != 3:
        net.conv1 = nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
    if small_input:
        # 48-64 px faces: a 3x3 stride-1 stem without max-pool keeps enough resolution.
        net.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


@BACKBONES.register("resnet18")
def resnet18(in_chans: int = 3, small_input: bool = False) -> tuple[nn.Module, int]:
    """torchvision ResNet-18 (random init); ``small_input`` swaps the stem for 48-64 px images."""
    return _torchvision_resnet("resnet18", in_chans, small_input)


@BACKBONES.register("resnet50")
def resnet50(in_chans: int = 3, small_input: bool = False) -> tuple[nn.Module, int]:
    """torchvision ResNet-50 (random init); ``small_input`` swaps the stem for 48-64 px images."""
    return _torchvision_resnet("resnet50", in_chans, small_input)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe_backbones() -> list[tuple[str, int | None, str]]:
    """(name, parameter count at defaults, first docstring line) for every registered backbone;
    families (``tv:NAME``, ``timm:NAME``) and backbones that need arguments (``ensemble``) have no count."""
    rows: list[tuple[str, int | None, str]] = []
    for name, fn in BACKBONES.items():
        # Built on the meta device: counts without allocating or initialising IR-100's 65M weights.
        try:
            with torch.device("meta"):
                module, _ = fn()
            count = count_parameters(module)
        except ValueError:   # built only from its arguments (the ensemble of other backbones): no count
            count = None
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        rows.append((name, count, doc))
    for prefix, fn in BACKBONES.families():
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        rows.append((f"{prefix}:NAME", None, doc))
    return rows


__all__ = ["small_cnn", "resnet18", "resnet50", "count_parameters", "describe_backbones"]
