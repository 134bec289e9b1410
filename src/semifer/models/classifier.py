"""The expression classifier: input normalisation + registered backbone + linear head."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from semifer.registry import BACKBONES


class Classifier(nn.Module):
    """Maps float images in [0, 1], shape (B, C, H, W), to class logits.

    Normalisation lives inside the model (as buffers) so checkpoints and exported
    models take the same raw [0, 1] input everywhere. A backbone trained with its own
    input statistics declares them as ``input_mean`` / ``input_std`` (RGB, on the [0, 1]
    scale) and they replace ``mean`` / ``std``; a 1-channel model uses their averages.
    """

    def __init__(self, backbone: str, num_classes: int, in_chans: int = 3,
                 mean: float = 0.5, std: float = 0.25, mirror_average: bool = False, **backbone_args: Any) -> None:
        super().__init__()
        self.mirror_average = bool(mirror_average)
        self.backbone, dim = BACKBONES.get(backbone)(in_chans=in_chans, **backbone_args)
        self.head = nn.Linear(dim, num_classes)
        self.register_buffer("mean", _channel_stats(getattr(self.backbone, "input_mean", None), mean, in_chans),
                             persistent=False)
        self.register_buffer("std", _channel_stats(getattr(self.backbone, "input_std", None), std, in_chans),
                             persistent=False)
        self.frozen_norms: list[str] = []   # backbone norm layers kept in eval mode (model.freeze_*)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.head(self.backbone((x - self.mean) / self.std))
        if self.mirror_average and not self.training:
            # a face and its mirror image show the same expression; averaging their logits
            # removes some of the model's left/right noise
            z = (z + self.head(self.backbone((x.flip(3) - self.mean) / self.std))) / 2
        return z

    def freeze(self, stages: int = 0, bn: bool = False) -> None:
        """Freeze the backbone's first ``stages`` stages (-1: all) and, with ``bn``, its BatchNorms."""
        from semifer.models.finetune import freeze

        self.frozen_norms = freeze(self.backbone, stages, bn)
        self.train(self.training)

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        # Frozen norm layers keep their running statistics, also while the rest trains.
        for name in self.frozen_norms:
            self.backbone.get_submodule(name).eval()
        return self


def _channel_stats(stats: tuple[float, ...] | None, default: float, in_chans: int) -> torch.Tensor:
    if stats is None:
        return torch.full((1, in_chans, 1, 1), float(default))
    values = [float(v) for v in stats]
    if in_chans != len(values):
        values = [sum(values) / len(values)] * in_chans
    return torch.tensor(values).view(1, in_chans, 1, 1)


def build_model(cfg: "ModelConfig", num_classes: int, in_chans: int) -> Classifier:  # noqa: F821
    """Build the classifier described by a :class:`semifer.config.ModelConfig` (random weights;
    ``cfg.pretrained`` is loaded by :func:`semifer.models.pretrained.load_pretrained`)."""
    model = Classifier(cfg.backbone, num_classes, in_chans=in_chans,
                       mirror_average=getattr(cfg, "mirror_average", False), **cfg.backbone_args)
    freeze_stages, freeze_bn = getattr(cfg, "freeze_stages", 0), getattr(cfg, "freeze_bn", False)
    if freeze_stages or freeze_bn:
        model.freeze(freeze_stages, freeze_bn)
    return model
