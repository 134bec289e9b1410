"""MobileFaceNet (Chen et al., 2018): a 1M-parameter face-recognition network for 112 px faces.

Module names follow the widely used PyTorch port in InsightFace_Pytorch (``conv1,
conv2_dw, conv_23, conv_3, conv_34, conv_4, conv_45, conv_5, conv_6_sep, conv_6_dw,
linear, bn``; blocks ``conv``/``conv_dw``/``project`` of ``conv, bn, prelu``), whose
released ``model_mobilefacenet.pth`` therefore loads by name.
"""
from __future__ import annotations

import torch
from torch import nn

from semifer.registry import BACKBONES


class ConvBlock(nn.Module):
    """conv - BN - PReLU (``linear=True``: no PReLU, the 'linear bottleneck' projection)."""

    def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1, p: int = 0, groups: int = 1,
                 linear: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, p, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.prelu = None if linear else nn.PReLU(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return x if self.prelu is None else self.prelu(x)


class DepthWise(nn.Module):
    """Inverted residual: 1x1 expand - 3x3 depthwise (stride) - 1x1 linear project (+ input)."""

    def __init__(self, cin: int, cout: int, s: int, groups: int, residual: bool = False) -> None:
        super().__init__()
        self.conv = ConvBlock(cin, groups)
        self.conv_dw = ConvBlock(groups, groups, 3, s, 1, groups=groups)
        self.project = ConvBlock(groups, cout, linear=True)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.conv_dw(self.conv(x)))
        return x + out if self.residual else out


class Residual(nn.Module):
    def __init__(self, c: int, num_block: int, groups: int) -> None:
        super().__init__()
        self.model = nn.Sequential(*[DepthWise(c, c, 1, groups, residual=True) for _ in range(num_block)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class MobileFaceNet(nn.Module):
    """Input 112 px (``pool='gdc'``, the paper's global depthwise conv) or any size (``pool='avg'``)."""

    input_mean = (0.5, 0.5, 0.5)
    input_std = (0.5, 0.5, 0.5)

    def __init__(self, in_chans: int = 3, width: int = 64, embedding: int = 128, input_size: int = 112,
                 pool: str = "gdc") -> None:
        super().__init__()
        if pool not in ("gdc", "avg"):
            raise ValueError(f"mobilefacenet pool must be 'gdc' or 'avg', got {pool!r}")
        w, w2 = width, 2 * width
        self.pool = pool
        self.conv1 = ConvBlock(in_chans, w, 3, 2, 1)
        self.conv2_dw = ConvBlock(w, w, 3, 1, 1, groups=w)
        self.conv_23 = DepthWise(w, w, 2, groups=2 * w)
        self.conv_3 = Residual(w, 4, groups=2 * w)
        self.conv_34 = DepthWise(w, w2, 2, groups=2 * w2)
        self.conv_4 = Residual(w2, 6, groups=2 * w2)
        self.conv_45 = DepthWise(w2, w2, 2, groups=4 * w2)
        self.conv_5 = Residual(w2, 2, groups=2 * w2)
        self.conv_6_sep = ConvBlock(w2, 8 * w)
        if pool == "gdc":
            side = input_size // 16
            self.conv_6_dw = ConvBlock(8 * w, 8 * w, side, 1, 0, groups=8 * w, linear=True)
            self.linear = nn.Linear(8 * w, embedding, bias=False)
            self.bn = nn.BatchNorm1d(embedding)
            self.out_dim = embedding
        else:
            self.out_dim = 8 * w
        self.pretrained_ignore = ("conv_6_dw.", "linear.", "bn.") if pool == "avg" else ()
        self.stages = [["conv1", "conv2_dw"], ["conv_23", "conv_3"], ["conv_34", "conv_4"], ["conv_45", "conv_5"],
                       ["conv_6_sep", "conv_6_dw", "linear", "bn"]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_3(self.conv_23(self.conv2_dw(self.conv1(x))))
        x = self.conv_5(self.conv_45(self.conv_4(self.conv_34(x))))
        x = self.conv_6_sep(x)
        if self.pool == "avg":
            return x.mean((2, 3))
        return self.bn(self.linear(torch.flatten(self.conv_6_dw(x), 1)))


@BACKBONES.register("mobilefacenet")
def mobilefacenet(in_chans: int = 3, width: int = 64, embedding: int = 128, input_size: int = 112,
                  pool: str = "gdc") -> tuple[nn.Module, int]:
    """MobileFaceNet (1M params, 112 px, 128-D embedding); pool=avg for other sizes."""
    net = MobileFaceNet(in_chans, width, embedding, input_size, pool)
    return net, net.out_dim
