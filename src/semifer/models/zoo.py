"""Open-ended backbone families: ``tv:NAME`` (any torchvision classification model) and
``timm:NAME`` (any timm model, when the optional ``timm`` extra is installed).

Both are built with random weights (nothing is downloaded); pretrained weights come
from a local state dict through ``model.pretrained`` (:mod:`semifer.models.pretrained`).
The classification layer is replaced by an identity; its checkpoint keys are listed in
``pretrained_ignore`` so loading a full ImageNet state dict drops exactly those.
"""
from __future__ import annotations

from torch import nn

from semifer.registry import BACKBONES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _drop_classifier(net: nn.Module) -> tuple[int, str]:
    """Replace the final Linear of ``net`` by an identity; returns (feature dim, its key prefix)."""
    for attr in ("fc", "classifier", "heads", "head"):
        layer = getattr(net, attr, None)
        if isinstance(layer, nn.Linear):
            setattr(net, attr, nn.Identity())
            return layer.in_features, f"{attr}."
        if isinstance(layer, nn.Sequential) and len(layer) and isinstance(layer[-1], nn.Linear):
            idx = len(layer) - 1
            dim = layer[idx].in_features
            layer[idx] = nn.Identity()
            return dim, f"{attr}.{idx}."
    raise ValueError(f"cannot find the classification layer of {type(net).__name__} (looked for a Linear "
                     "in fc / classifier / heads / head)")


def _gray_stem(net: nn.Module, in_chans: int) -> None:
    """Give the first convolution ``in_chans`` inputs (same geometry, random weights)."""
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.in_channels == in_chans:
                return
            new = nn.Conv2d(in_chans, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                            m.groups if m.groups == 1 else in_chans, m.bias is not None, m.padding_mode)
            parent = net.get_submodule(name.rpartition(".")[0]) if "." in name else net
            setattr(parent, name.rpartition(".")[2], new)
            return
    raise ValueError(f"{type(net).__name__} has no Conv2d stem to adapt to {in_chans} channels")


@BACKBONES.register_family("tv")
def torchvision_model(name: str, in_chans: int = 3, small_input: bool = False, **kwargs) -> tuple[nn.Module, int]:
    """tv:NAME, any torchvision classification model (e.g. tv:resnet34, tv:efficientnet_b0), random init."""
    import torchvision

    try:
        net = torchvision.models.get_model(name, weights=None, **kwargs)
    except ValueError as e:
        raise KeyError(f"tv:{name}: not a torchvision model ({e})") from None
    dim, head = _drop_classifier(net)
    if in_chans != 3:
        _gray_stem(net, in_chans)
    if small_input:
        if not (hasattr(net, "conv1") and hasattr(net, "maxpool")):
            raise ValueError(f"tv:{name}: small_input applies to ResNet-style models (conv1 + maxpool)")
        # 48-64 px faces: a 3x3 stride-1 stem without max-pool keeps enough resolution.
        net.conv1 = nn.Conv2d(in_chans, net.conv1.out_channels, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    net.input_mean, net.input_std = IMAGENET_MEAN, IMAGENET_STD
    net.pretrained_ignore = (head,)
    if all(hasattr(net, f"layer{i}") for i in range(1, 5)):
        net.stages = [[n for n in ("conv1", "bn1") if hasattr(net, n)], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]
    return net, dim


@BACKBONES.register_family("timm")
def timm_model(name: str, in_chans: int = 3, **kwargs) -> tuple[nn.Module, int]:
    """timm:NAME, any timm model (pip install 'semifer[timm]'), random init, classifier removed."""
    try:
        import timm
    except ImportError:
        raise ImportError(f"backbone timm:{name} needs timm: pip install 'semifer[timm]'") from None
    try:
        net = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
    except RuntimeError as e:  # timm raises RuntimeError('Unknown model ...')
        raise KeyError(f"timm:{name}: {e}") from None
    cfg = dict(getattr(net, "pretrained_cfg", None) or {})
    net.input_mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    net.input_std = tuple(cfg.get("std", IMAGENET_STD))
    heads = cfg.get("classifier") or ()
    net.pretrained_ignore = tuple(f"{h}." for h in ((heads,) if isinstance(heads, str) else heads))
    return net, int(net.num_features)
