"""What the trainer lends an algorithm outside a step: the teacher in eval mode and the data."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from semifer.eval.evaluate import predict_logits


@dataclass
class StepContext:
    """Handed to ``Algorithm.before_step``: enough to run the teacher over a data set and log."""

    teacher: nn.Module                 # the EMA teacher's module (eval-mode predictions)
    device: torch.device
    amp: torch.dtype | None
    total_steps: int
    eval_batch_size: int = 512
    log: Callable[[dict], None] = lambda record: None

    def logits(self, images: torch.Tensor, flip: bool = False) -> torch.Tensor:
        """Teacher logits (N, C) on uint8 images; ``flip`` averages with the mirrored faces' logits."""
        kw = dict(batch_size=self.eval_batch_size, device=self.device, amp_dtype=self.amp)
        out = predict_logits(self.teacher, images, **kw)
        if flip:
            out = (out + predict_logits(self.teacher, images.flip(-1), **kw)) / 2
        return out
