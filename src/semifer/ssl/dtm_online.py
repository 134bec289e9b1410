"""DTM online: FixMatch-style consistency training with DTM's precision-target thresholds.

The stage schedule: ``warmup_steps`` supervised steps, then ``lambda_u`` ramps over
``ramp_steps``. The calibration (temperature + per-class bias) is fitted on the held-out
labeled slice with the EMA teacher when the unlabeled loss starts and every
``calib_every`` steps after; the per-class confidence histogram follows the teacher's
weak-view predictions with an EMA. docs/method.md has the formula.
"""
from __future__ import annotations

import torch

from semifer.config import SSLConfig
from semifer.registry import ALGORITHMS
from semifer.ssl.algorithms import PseudoLabelAlgorithm
from semifer.ssl.context import StepContext
from semifer.ssl.dtm import PrecisionThreshold
from semifer.ssl.thresholds import ThresholdPolicy


@ALGORITHMS.register("dtm")
class DTM(PseudoLabelAlgorithm):
    """Dynamic threshold module, online (docs/method.md, "DTM")."""

    uses_holdout = True

    def __init__(self, cfg: SSLConfig, num_classes: int, labeled_counts: torch.Tensor,
                 num_unlabeled: int | None = None, imbalance: str = "none") -> None:
        if cfg.soft_mask or cfg.distribution_alignment is True:
            # Both act on raw probabilities; DTM's thresholds are on calibrated, prior-shifted ones.
            raise ValueError("dtm does not combine with ssl.soft_mask or ssl.distribution_alignment "
                             "(its thresholds hold for calibrated probabilities); use dtm_flex for those")
        super().__init__(cfg, num_classes, labeled_counts, num_unlabeled, imbalance)
        self.holdout = None

    def make_policy(self, cfg: SSLConfig, num_classes: int, num_unlabeled: int | None) -> ThresholdPolicy:
        return PrecisionThreshold(num_classes, cfg.target_precision, cfg.precision_floor, cfg.hist_bins,
                                  cfg.hist_momentum, prior_shift=cfg.prior_shift,
                                  holdout_evidence=cfg.holdout_evidence,
                                         evidence_side=cfg.holdout_evidence_side,
                                         bias_prior=cfg.calibration_bias_prior)

    def bind(self, unlabeled=None, holdout=None) -> None:
        if holdout is None or len(holdout) == 0:
            raise ValueError("dtm calibrates its thresholds on a held-out labeled slice: set ssl.holdout_fraction > 0")
        self.holdout = holdout

    def unlabeled_weight(self, step: int) -> float:
        c = self.cfg
        if step < c.warmup_steps:
            return 0.0
        if c.ramp_steps <= 0:
            return c.lambda_u
        return c.lambda_u * min(1.0, (step - c.warmup_steps + 1) / c.ramp_steps)

    @torch.no_grad()
    def before_step(self, step: int, ctx: StepContext) -> None:
        c = self.cfg
        if step < c.warmup_steps:
            return
        due = int(self.policy.calibrations) == 0 or (step - c.warmup_steps) % max(c.calib_every, 1) == 0
        if not due or self.holdout is None or len(self.holdout) == 0:
            return
        self.policy.calibrate(ctx.logits(self.holdout.images, flip=c.label_flip), self.holdout.labels)
        self.policy.refresh()
        ctx.log({"kind": "calibration", "step": step, "temperature": float(self.policy.temperature),
                 "bias": self.policy.bias.tolist(), "thresholds": self.policy.thresholds().tolist(),
                 "holdout_precision": [None if v < 0 else v for v in self.policy.holdout_precision.tolist()]})
