"""The expression classifier: input normalisation + registered backbone + linear head."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from semifer.registry import BACKBONES


class Classifier(nn.Module):
    """Maps float images in [0, 1], shape (B, C, H, W), to class logits.

    Normalisation lives inside the model (as buffers) so checkpoints and exported
    models take the same raw [0, 1] input everywhere.
    """

    def __init__(self, backbone: str, num_classes: int, in_chans: int = 3,
                 mean: float = 0.5, std: float = 0.25, **backbone_args: Any) -> None:
        super().__init__()
        self.backbone, dim = BACKBONES.get(backbone)(in_chans=in_chans, **backbone_args)
        self.head = nn.Linear(dim, num_classes)
        self.register_buffer("mean", torch.full((1, in_chans, 1, 1), float(mean)), persistent=False)
        self.register_buffer("std", torch.full((1, in_chans, 1, 1), float(std)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone((x - self.mean) / self.std))


def build_model(cfg: "ModelConfig", num_classes: int, in_chans: int) -> Classifier:  # noqa: F821
    """Build the classifier described by a :class:`semifer.config.ModelConfig`."""
    return Classifier(cfg.backbone, num_classes, in_chans=in_chans, **cfg.backbone_args)
