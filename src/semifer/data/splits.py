"""Class-stratified labeled subsets, deterministic by seed and saved with the run."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def stratified_subset(labels: torch.Tensor, *, fraction: float = 0.0, per_class: int = 0,
                      seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rest) index tensors: ``fraction`` of each class, or ``per_class`` of each.

    Each class keeps at least one sample when it has any (rounding never empties a
    class). Within a class the choice is a seeded permutation, so the same labels and
    seed always give the same split; both outputs are sorted.
    """
    if (fraction > 0) == (per_class > 0):
        raise ValueError("give exactly one of fraction (0 < f <= 1) or per_class (> 0)")
    if fraction > 1:
        raise ValueError(f"fraction must be at most 1, got {fraction}")
    g = torch.Generator().manual_seed(int(seed))
    chosen = []
    for c in torch.unique(labels[labels >= 0]).tolist():
        idx = torch.nonzero(labels == c).flatten()
        k = max(1, round(fraction * len(idx))) if fraction > 0 else min(per_class, len(idx))
        chosen.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    sel = torch.sort(torch.cat(chosen)).values if chosen else torch.empty(0, dtype=torch.long)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[sel] = False
    return sel, torch.nonzero(mask).flatten()


def save_split(path: Path, chosen: torch.Tensor, rest: torch.Tensor, meta: dict) -> None:
    """Write the split (indices into the labeled source) so a run can be reproduced."""
    path.write_text(json.dumps({**meta, "labeled": chosen.tolist(), "rest": rest.tolist()}))
