"""Soft pseudo-label weights below a class's threshold (class-wise, SoftMatch-style).

A hard threshold throws away every pseudo-label below it. On FER data the teacher is
rarely confident about fear, sadness or disgust (docs/benchmarks.md), so those classes
never reach the student. With ``ssl.soft_mask: true`` a sample whose teacher confidence
``p`` is below its class threshold ``tau_t(c)`` keeps a weight that falls off as a Gaussian
of the gap, scaled by the spread of that class's confidences:

    w = 1                                          if p >= tau_t(c)
    w = exp(-(tau_t(c) - p)^2 / (2 * sigma_t(c)^2))  otherwise

``sigma_t(c)^2`` is an EMA (momentum ``m``) of the variance of the teacher's confidence over
the unlabeled samples it predicts as ``c`` (SoftMatch, Chen et al. 2023, uses one global
mean/variance and no class thresholds). Buffers hold the EMAs; batch sums are all-reduced
under DDP before they touch them, and nothing syncs with the host.
"""
from __future__ import annotations

import torch
from torch import nn

from semifer import dist


class SoftMask(nn.Module):
    """Per-class confidence statistics and the soft weights they give."""

    def __init__(self, num_classes: int, momentum: float = 0.999, init_var: float = 0.01) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"soft-mask momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.register_buffer("conf_mean", torch.full((num_classes,), 1.0 / num_classes))
        self.register_buffer("conf_var", torch.full((num_classes,), float(init_var)))

    @torch.no_grad()
    def update(self, conf: torch.Tensor, pred: torch.Tensor) -> None:
        """Absorb one batch: teacher confidences (B,) and predicted classes (B,)."""
        conf = conf.detach().float()
        finite = torch.isfinite(conf)
        conf = torch.where(finite, conf, torch.zeros_like(conf))
        one = finite.float()
        c = self.conf_mean.numel()
        sums = torch.stack([torch.zeros(c, device=conf.device).scatter_add_(0, pred, v)
                            for v in (one, conf * one, conf * conf * one)])
        n, s1, s2 = dist.all_reduce_sum(sums)
        seen = n > 0
        mean = s1 / n.clamp_min(1.0)
        var = (s2 / n.clamp_min(1.0) - mean * mean).clamp_min(0.0)
        m = self.momentum
        self.conf_mean.copy_(torch.where(seen, m * self.conf_mean + (1 - m) * mean, self.conf_mean))
        self.conf_var.copy_(torch.where(seen, m * self.conf_var + (1 - m) * var, self.conf_var))

    def weights(self, conf: torch.Tensor, pred: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        """Weight in [0, 1] of each sample's pseudo-label (1 at or above its class threshold)."""
        gap = (thresholds.to(conf.dtype)[pred] - conf).clamp_min(0.0)
        var = self.conf_var.to(conf.dtype)[pred].clamp_min(1e-6)
        return torch.exp(-gap * gap / (2.0 * var))
