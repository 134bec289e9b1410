"""face.evoLVe's IR-50 (``backbone/model_irse.py``), so its ``backbone_ir50_*.pth`` loads.

It differs from insightface's iResNet-50 (:mod:`semifer.models.iresnet`) in the block
(BN - conv - PReLU - conv(stride) - BN, no middle BN) and in the shortcut of stride-2
blocks whose width does not change (a parameter-free 1x1 max-pool), so the two
checkpoints are not interchangeable. Names: ``input_layer``, ``body.N.shortcut_layer``,
``body.N.res_layer``, ``output_layer``.
"""
from __future__ import annotations

import torch
from torch import nn

from semifer.registry import BACKBONES

IR50_UNITS = [3, 4, 14, 3]


class BottleneckIR(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        if cin == cout:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.res_layer = nn.Sequential(nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
                                       nn.PReLU(cout), nn.Conv2d(cout, cout, 3, stride, 1, bias=False),
                                       nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class EvolveIR(nn.Module):
    """face.evoLVe IR network; ``pool='avg'`` replaces the 7x7-flatten embedding by global pooling."""

    input_mean = (0.5, 0.5, 0.5)   # evoLVe normalises with mean 0.5, std 0.5
    input_std = (0.5, 0.5, 0.5)

    def __init__(self, units: list[int], in_chans: int = 3, width: int = 64, num_features: int = 512,
                 input_size: int = 112, pool: str = "flatten", dropout: float = 0.0) -> None:
        super().__init__()
        if pool not in ("flatten", "avg"):
            raise ValueError(f"ir50_evolve pool must be 'flatten' or 'avg', got {pool!r}")
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.pool, self.input_size = pool, input_size
        self.input_layer = nn.Sequential(nn.Conv2d(in_chans, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                         nn.PReLU(width))
        body, cin, self.stage_ends = [], width, []
        for w, n in zip(widths, units):
            body += [BottleneckIR(cin, w, 2)] + [BottleneckIR(w, w, 1) for _ in range(n - 1)]
            cin = w
            self.stage_ends.append(len(body))
        self.body = nn.Sequential(*body)
        if pool == "flatten":
            side = input_size // 16
            # Indices matter: output_layer.0 (BN), .3 (Linear), .4 (BN1d) are the checkpoint's keys.
            self.output_layer = nn.Sequential(nn.BatchNorm2d(cin), nn.Dropout(dropout), nn.Flatten(),
                                              nn.Linear(cin * side * side, num_features),
                                              nn.BatchNorm1d(num_features))
            self.out_dim = num_features
        else:
            self.output_layer = nn.Sequential(nn.BatchNorm2d(cin), nn.Dropout(dropout))
            self.out_dim = cin
        self.pretrained_ignore = ("output_layer.3.", "output_layer.4.") if pool == "avg" else ()
        starts = [0] + self.stage_ends[:-1]
        self.stages = [["input_layer"]] + [[f"body.{i}" for i in range(a, b)] for a, b in zip(starts, self.stage_ends)]
        self.stages.append(["output_layer"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.input_layer(x))
        if self.pool == "avg":
            return self.output_layer(x).mean((2, 3))
        side = self.input_size // 16
        if x.shape[-2:] != (side, side):
            raise ValueError(f"ir50_evolve with pool='flatten' needs {self.input_size}x{self.input_size} input; "
                             "use backbone_args {pool: avg} for other sizes")
        return self.output_layer(x)


@BACKBONES.register("ir50_evolve")
def ir50_evolve(in_chans: int = 3, width: int = 64, num_features: int = 512, input_size: int = 112,
                pool: str = "flatten", dropout: float = 0.0) -> tuple[nn.Module, int]:
    """face.evoLVe IR-50 (112 px; loads backbone_ir50_*.pth); pool=avg for other sizes."""
    net = EvolveIR(IR50_UNITS, in_chans, width, num_features, input_size, pool, dropout)
    return net, net.out_dim
