"""iResNet (IR-18/34/50/100), the ArcFace backbones of insightface's ``arcface_torch``.

Module and parameter names follow ``arcface_torch/backbones/iresnet.py`` exactly
(``conv1, bn1, prelu, layer1..4, bn2, dropout, fc, features``; blocks with
``bn1, conv1, bn2, prelu, conv2, bn3, downsample``) so their ``backbone.pth``
loads as it is (:mod:`semifer.models.pretrained`).
"""
from __future__ import annotations

import torch
from torch import nn

from semifer.registry import BACKBONES

DEPTHS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 14, 3], 100: [3, 13, 30, 3]}


class IBasicBlock(nn.Module):
    """BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, plus the (projected) input."""

    def __init__(self, cin: int, cout: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """insightface iResNet. ``pool='flatten'`` is theirs (BN - flatten - FC - BN1d embedding,
    fixed ``input_size``); ``pool='avg'`` global-average-pools after ``bn2`` (any input size,
    no ``fc``/``features``), for expression work at 48-112 px."""

    input_mean = (0.5, 0.5, 0.5)   # arcface_torch trains on (img / 255 - 0.5) / 0.5
    input_std = (0.5, 0.5, 0.5)

    def __init__(self, layers: list[int], in_chans: int = 3, width: int = 64, num_features: int = 512,
                 input_size: int = 112, pool: str = "flatten", dropout: float = 0.0) -> None:
        super().__init__()
        if pool not in ("flatten", "avg"):
            raise ValueError(f"iresnet pool must be 'flatten' or 'avg', got {pool!r}")
        if input_size % 16:
            raise ValueError(f"iresnet input_size must be a multiple of 16, got {input_size}")
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.pool, self.input_size = pool, input_size
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, eps=1e-5)
        self.prelu = nn.PReLU(width)
        cin = width
        for i, (w, n) in enumerate(zip(widths, layers)):
            down = nn.Sequential(nn.Conv2d(cin, w, 1, 2, bias=False), nn.BatchNorm2d(w, eps=1e-5))
            blocks = [IBasicBlock(cin, w, 2, down)] + [IBasicBlock(w, w) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = w
        self.bn2 = nn.BatchNorm2d(cin, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        if pool == "flatten":
            side = input_size // 16
            self.fc = nn.Linear(cin * side * side, num_features)
            self.features = nn.BatchNorm1d(num_features, eps=1e-5)
            nn.init.constant_(self.features.weight, 1.0)
            self.features.weight.requires_grad = False   # as in arcface_torch: a fixed-scale BN
            self.out_dim = num_features
        else:
            self.out_dim = cin
        # Checkpoint keys this variant knowingly drops (the embedding layers when pooling).
        self.pretrained_ignore = ("fc.", "features.") if pool == "avg" else ()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
        # Fine-tuning stages (semifer.models.finetune): stem, four residual stages, embedding neck.
        self.stages = [["conv1", "bn1", "prelu"], ["layer1"], ["layer2"], ["layer3"], ["layer4"],
                       ["bn2", "fc", "features"]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.bn2(x)
        if self.pool == "avg":
            return self.dropout(x.mean((2, 3)))
        side = self.input_size // 16
        if x.shape[-2:] != (side, side):
            raise ValueError(f"iresnet with pool='flatten' needs {self.input_size}x{self.input_size} input "
                             f"(data.image_size={self.input_size}), got {x.shape[-1] * 16} px; "
                             "use backbone_args {pool: avg} for other sizes")
        return self.features(self.fc(self.dropout(torch.flatten(x, 1))))


def _register(depth: int) -> None:
    def factory(in_chans: int = 3, width: int = 64, num_features: int = 512, input_size: int = 112,
                pool: str = "flatten", dropout: float = 0.0) -> tuple[nn.Module, int]:
        net = IResNet(DEPTHS[depth], in_chans, width, num_features, input_size, pool, dropout)
        return net, net.out_dim

    factory.__doc__ = (f"insightface iResNet-{depth} (ArcFace, 112 px; loads arcface_torch backbone.pth); "
                       "pool=avg for other sizes")
    factory.__name__ = f"ir{depth}"
    BACKBONES.register(f"ir{depth}")(factory)


for _d in DEPTHS:
    _register(_d)
