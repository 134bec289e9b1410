"""The ABAW expression metric and friends.

Macro-F1 is averaged over a *fixed* label list (all 8 ABAW classes by default):
a class with no true and no predicted samples scores F1 = 0 and still counts,
exactly as the challenge scores it (sklearn's ``f1_score(labels=range(8),
average='macro', zero_division=0)``).
"""
from __future__ import annotations

import torch

from semifer.labels import ABAW_LABELS


def confusion_matrix(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts (C, C): rows are true classes, columns predicted classes."""
    y_true = torch.as_tensor(y_true).long().flatten()
    y_pred = torch.as_tensor(y_pred).long().flatten()
    flat = y_true * num_classes + y_pred
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores_from_confusion(cm: torch.Tensor, labels: tuple[str, ...] = ABAW_LABELS) -> dict:
    """macro_f1, accuracy, per_class_f1 (name -> F1) and the confusion matrix as lists."""
    cm = cm.double()
    tp = cm.diag()
    precision_den = cm.sum(0)
    recall_den = cm.sum(1)
    f1_den = precision_den + recall_den
    f1 = torch.where(f1_den > 0, 2 * tp / f1_den.clamp_min(1e-12), torch.zeros_like(tp))
    total = cm.sum()
    return {
        "macro_f1": float(f1.mean()),
        "accuracy": float(tp.sum() / total) if total > 0 else 0.0,
        "per_class_f1": {name: float(v) for name, v in zip(labels, f1)},
        "confusion": cm.long().tolist(),
        "count": int(total),
    }


def classification_scores(y_true, y_pred, labels: tuple[str, ...] = ABAW_LABELS) -> dict:
    """Scores of integer predictions against integer targets over the fixed ``labels`` list."""
    return scores_from_confusion(confusion_matrix(y_true, y_pred, len(labels)), labels)
