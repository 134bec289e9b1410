"""Distribution alignment of the teacher's pseudo-label probabilities.

A teacher trained on an imbalanced labeled set (FER2013: a quarter of the faces are
happy) over-predicts its frequent classes on unlabeled faces, and its *confident*
predictions are even more skewed (measured on the FER2013 10 % setting: 80-93 % of the
accepted pseudo-labels were "happy"). Distribution alignment (ReMixMatch, Berthelot et
al. 2020) rescales every teacher probability vector so that, on average, the teacher
predicts the labeled class prior:

    p~(c) = p(c) * target(c) / running(c)   (renormalised over c)

``running`` is an EMA of the teacher's mean probability vector over unlabeled batches,
``target`` the labeled class prior, or (``target="uniform"``) the uniform distribution over
the classes that have labeled examples; classes without labeled examples get 0, so they are
never pseudo-labelled. Both are buffers: checkpointed, moved with the module, and the
batch mean is all-reduced under DDP before it updates ``running``.
"""
from __future__ import annotations

import torch
from torch import nn

from semifer import dist


class DistributionAlignment(nn.Module):
    """Align teacher probabilities to ``target`` (the labeled class prior)."""

    def __init__(self, labeled_counts: torch.Tensor, momentum: float = 0.99, target: str = "labeled") -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"alignment momentum must be in [0, 1), got {momentum}")
        counts = labeled_counts.detach().float()
        if counts.sum() <= 0:
            raise ValueError("distribution alignment needs labeled examples")
        if target == "uniform":  # balanced pseudo-labels: what a macro-F1 metric rewards
            counts = (counts > 0).float()
        elif target != "labeled":
            raise ValueError(f"alignment target must be 'labeled' or 'uniform', not {target!r}")
        self.momentum = float(momentum)
        self.register_buffer("target", counts / counts.sum())
        # Start from the target: no correction until the teacher has shown its bias.
        self.register_buffer("running", (counts / counts.sum()).clone())

    @torch.no_grad()
    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        """Update the running mean with this batch, then return the aligned probabilities."""
        probs = probs.detach().float()
        # Rows with NaN/inf (a diverging step, which the trainer will skip) must not reach the buffer.
        finite = torch.isfinite(probs).all(dim=1, keepdim=True)
        sums = torch.cat([torch.where(finite, probs, 0.0).sum(dim=0), finite.sum().float().view(1)])
        sums = dist.all_reduce_mean(sums)  # mean of sums and of counts: their ratio is the global mean
        batch_mean = sums[:-1] / sums[-1].clamp_min(1e-12)
        new = self.running * self.momentum + batch_mean * (1.0 - self.momentum)
        self.running.copy_(torch.where(sums[-1] > 0, new, self.running))
        ratio = self.target / self.running.clamp_min(1e-6)
        aligned = probs * ratio
        return aligned / aligned.sum(dim=1, keepdim=True).clamp_min(1e-12)
