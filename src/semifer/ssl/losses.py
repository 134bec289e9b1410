"""Loss pieces shared by the algorithms."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def supervised_loss(logits: torch.Tensor, target: torch.Tensor, labeled_counts: torch.Tensor,
                    imbalance: str = "none", label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy on labeled data, optionally corrected for class imbalance.

    ``logit_adjust``: CE(logits + log prior) (Menon et al., 2021), so the trained
    logits estimate balanced posteriors; ``class_balanced``: per-class weights
    proportional to 1 / count, normalised to mean 1 over present classes.
    ``label_smoothing`` = e: the target is (1 - e) one-hot + e / C (Szegedy et al., 2016).
    """
    ls = label_smoothing
    if imbalance == "none":
        return F.cross_entropy(logits, target, label_smoothing=ls)
    counts = labeled_counts.to(logits.device, torch.float32)
    if imbalance == "logit_adjust":
        prior = (counts + 1e-3) / (counts + 1e-3).sum()
        return F.cross_entropy(logits + prior.log().to(logits.dtype), target, label_smoothing=ls)
    if imbalance == "class_balanced":
        present = counts > 0
        w = torch.where(present, 1.0 / counts.clamp_min(1.0), torch.zeros_like(counts))
        w = w * present.sum() / w.sum().clamp_min(1e-12)
        return F.cross_entropy(logits, target, weight=w.to(logits.dtype), label_smoothing=ls)
    raise ValueError(f"unknown imbalance option {imbalance!r}")


def masked_pseudo_label_loss(logits: torch.Tensor, pseudo: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over all unlabeled samples of mask * CE(strong-view logits, pseudo-label)."""
    return (F.cross_entropy(logits, pseudo, reduction="none") * mask).mean()


def _sum_norm(x: torch.Tensor) -> torch.Tensor:
    return x / x.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def freematch_fairness_loss(logits_s: torch.Tensor, mask: torch.Tensor, p_model: torch.Tensor,
                            label_hist: torch.Tensor) -> torch.Tensor:
    """FreeMatch's self-adaptive fairness term, with the published sign (Wang et al., 2023, eq. 11).

    L_f = -H(SumNorm(p_t / h_t), SumNorm(pbar / hbar)) = + sum_c target(c) * log batch(c):
    target = SumNorm(p_t / h_t) is the teacher's class model de-biased by its own histogram
    (EMAs, no gradient), batch = SumNorm(pbar / hbar) the same for the strong views of the
    accepted samples in this batch (hbar from argmax, no gradient). The value is <= 0 and is
    *added* to the loss, i.e. the cross-entropy is maximised. This is eq. 11 as published and
    as USB implements it (semilearn/algorithms/freematch ``entropy_loss``, no minus sign);
    the maintainers confirm it is intended (microsoft/Semi-supervised-learning issue #182):
    with target = batch it is -H(batch), so minimising it maximises the entropy of the
    de-biased mean prediction, and the target is replaced by the momentum-smoothed estimate
    for stability. Computed with masks instead of boolean indexing to avoid host syncs.
    """
    probs = logits_s.float().softmax(dim=1)
    w = mask.float().unsqueeze(1)
    n = w.sum().clamp_min(1.0)
    pbar = (probs * w).sum(0) / n
    hbar = torch.zeros_like(pbar).scatter_add_(0, probs.argmax(1), mask.float()) / n
    inv = lambda h: torch.where(h > 0, 1.0 / h.clamp_min(1e-12), torch.zeros_like(h))  # noqa: E731
    target = _sum_norm(p_model.float() * inv(label_hist.float())).detach()
    batch = _sum_norm(pbar * inv(hbar).detach())
    loss = (target * (batch + 1e-12).log()).sum()  # published sign (eq. 11), see docstring
    return torch.where(mask.sum() > 0, loss, torch.zeros_like(loss))
