"""Exponential moving average of the student's weights (the default teacher)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA(nn.Module):
    """EMA copy of a model; decay ramps up as min(decay, (1 + t) / (10 + t)).

    The ramp lets the teacher track the quickly changing early student instead of
    staying near its random initialisation for thousands of steps.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        super().__init__()
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        self.decay = float(decay)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def train(self, mode: bool = True) -> "ModelEMA":
        # The teacher always predicts with running BatchNorm statistics.
        return super().train(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        ema_p = [p for p in self.module.parameters()]
        src_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - d)
        for eb, b in zip(self.module.buffers(), model.buffers()):
            eb.copy_(b)
