"""Scoring a model on an in-memory image set."""
from __future__ import annotations

import torch
from torch import nn

from semifer.data.augment import eval_view
from semifer.eval.metrics import classification_scores


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 512,
                   device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Logits (N, C) for uint8 images (N, C, H, W), in eval mode, batch by batch."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    outs = []
    for start in range(0, images.shape[0], batch_size):
        x = eval_view(images[start:start + batch_size].to(device, non_blocking=True))
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            outs.append(model(x).float().cpu())
    model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)


def evaluate_model(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, **kw) -> dict:
    """macro-F1, accuracy, per-class F1 and confusion of ``model`` on a labeled image set."""
    logits = predict_logits(model, images, **kw)
    return classification_scores(labels, logits.argmax(1))
