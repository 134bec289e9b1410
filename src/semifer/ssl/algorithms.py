"""Training algorithms: what one step computes from a batch.

An algorithm gets the student, the teacher and a batch of already-augmented views
and returns a scalar loss plus tensors to log. It never touches the optimizer,
the disk or the process group; all its memory is in buffers (via its policy).

Batch keys: ``x_l`` (weak labeled view), ``y_l``; and, when ``wants_unlabeled``:
``x_uw`` / ``x_us`` (weak / strong unlabeled views), ``idx_u`` (dataset indices
or None for streamed sources), optionally ``y_u_true`` (hidden labels, synthetic
data only, for pseudo-label accuracy diagnostics).
"""
from __future__ import annotations

import torch
from torch import nn

from semifer.config import SSLConfig
from semifer.registry import ALGORITHMS, THRESHOLDS
from semifer.ssl.alignment import DistributionAlignment
from semifer.ssl.losses import freematch_fairness_loss, masked_pseudo_label_loss, supervised_loss
from semifer.ssl.softmask import SoftMask
from semifer.ssl.thresholds import ThresholdPolicy, resolve_status_mode

Logs = dict[str, torch.Tensor]


class Algorithm(nn.Module):
    """Base: supervised loss on the labeled batch only."""

    uses_unlabeled = False
    uses_holdout = False                  # needs a held-out slice of the labeled set (ssl.holdout_fraction)
    unlabeled_views = ("weak", "strong")  # which augmented views of the unlabeled batch a step reads
    label_smoothing = 0.0                 # of the labeled loss (optim.label_smoothing; build_algorithm sets it)

    def __init__(self, cfg: SSLConfig, num_classes: int, labeled_counts: torch.Tensor,
                 num_unlabeled: int | None = None, imbalance: str = "none") -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.imbalance = imbalance
        self.register_buffer("labeled_counts", labeled_counts.detach().clone().long())
        self.policy: ThresholdPolicy | None = None

    def unlabeled_weight(self, step: int) -> float:
        """lambda_u at ``step`` (0 means the unlabeled batch is not needed)."""
        return 0.0

    def wants_unlabeled(self, step: int) -> bool:
        return self.uses_unlabeled and self.unlabeled_weight(step) > 0

    def bind(self, unlabeled=None, holdout=None) -> None:
        """Receive the in-memory unlabeled set and the held-out labeled slice (data, not state)."""

    def before_step(self, step: int, ctx) -> None:
        """Work outside the step (relabel, recalibrate) with the teacher in eval mode; ``ctx``: StepContext."""

    def unlabeled_indices(self, step: int, gen: torch.Generator, global_batch: int) -> torch.Tensor | None:
        """Dataset indices of the global unlabeled batch, or None for the source's own sampler."""
        return None

    def holdout_released(self, step: int, total_steps: int) -> bool:
        """True once the held-out labeled slice is no longer needed and may be trained on."""
        return False

    def labeled_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return supervised_loss(logits, y, self.labeled_counts, self.imbalance, self.label_smoothing)

    def step(self, student: nn.Module, teacher: nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, Logs]:
        loss = self.labeled_loss(student(batch["x_l"]), batch["y_l"])
        return loss, {"loss": loss.detach(), "loss_x": loss.detach()}


@ALGORITHMS.register("supervised")
class Supervised(Algorithm):
    """Labeled data only (the baseline every SSL method must beat)."""


class PseudoLabelAlgorithm(Algorithm):
    """FixMatch-style step: teacher labels the weak view, student learns the strong view.

    loss = CE(labeled) + lambda_u(step) * mean(mask * CE(student(strong), pseudo)).
    Subclasses choose the threshold policy.
    """

    uses_unlabeled = True
    aligns_by_default = False  # ssl.distribution_alignment: auto

    def __init__(self, cfg: SSLConfig, num_classes: int, labeled_counts: torch.Tensor,
                 num_unlabeled: int | None = None, imbalance: str = "none") -> None:
        super().__init__(cfg, num_classes, labeled_counts, num_unlabeled, imbalance)
        self.policy = self.make_policy(cfg, num_classes, num_unlabeled)
        align = cfg.distribution_alignment is True or (cfg.distribution_alignment == "auto" and self.aligns_by_default)
        self.alignment = DistributionAlignment(labeled_counts, cfg.alignment_momentum,
                                                cfg.alignment_target) if align else None
        self.soft_mask = SoftMask(num_classes, cfg.soft_mask_momentum) if cfg.soft_mask else None

    def make_policy(self, cfg: SSLConfig, num_classes: int, num_unlabeled: int | None) -> ThresholdPolicy:
        return THRESHOLDS.get("fixed")(num_classes, tau=cfg.tau)

    def unlabeled_weight(self, step: int) -> float:
        return self.cfg.lambda_u

    def extra_loss(self, logits_us: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        return None

    def step(self, student: nn.Module, teacher: nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, Logs]:
        lam = self.unlabeled_weight(step)
        if lam <= 0:
            return super().step(student, teacher, batch, step)
        x_l, y_l, x_uw, x_us = batch["x_l"], batch["y_l"], batch["x_uw"], batch["x_us"]
        n_l, n_u = x_l.shape[0], x_uw.shape[0]
        if teacher is student:
            # FixMatch proper: one forward over all views (shared BatchNorm statistics).
            logits = student(torch.cat([x_l, x_uw, x_us]))
            logits_l, logits_uw, logits_us = logits[:n_l], logits[n_l:n_l + n_u], logits[n_l + n_u:]
            probs = logits_uw.detach().float().softmax(dim=1)
        else:
            logits = student(torch.cat([x_l, x_us]))
            logits_l, logits_us = logits[:n_l], logits[n_l:]
            with torch.no_grad():
                probs = teacher(x_uw).float().softmax(dim=1)
        if self.alignment is not None:
            probs = self.alignment(probs)
        if self.policy.update_before_mask:  # FixMatch, FreeMatch (as USB): absorb the batch, then mask it
            self.policy.update(probs, batch.get("idx_u"))
            thr = self.policy.thresholds()
            mask, pseudo = self.policy.mask(probs, batch.get("idx_u"))
        else:  # FlexMatch, DTM (USB's FlexMatch hook): mask with the previous step's status, then update
            thr = self.policy.thresholds()
            mask, pseudo = self.policy.mask(probs, batch.get("idx_u"))
            self.policy.update(probs, batch.get("idx_u"))
        if self.soft_mask is not None:
            conf = probs.max(dim=1).values
            self.soft_mask.update(conf, pseudo)
            mask = self.soft_mask.weights(conf, pseudo, thr)  # the thresholds the hard mask used
        loss_x = self.labeled_loss(logits_l, y_l)
        logits_u = logits_us.float()
        if self.cfg.adaptive_margin > 0 and self.alignment is not None:
            logits_u = logits_u + self.cfg.adaptive_margin * self.alignment.running.clamp_min(1e-6).log()
        loss_u = masked_pseudo_label_loss(logits_u, pseudo, mask)
        loss = loss_x + lam * loss_u
        extra = self.extra_loss(logits_us, mask)
        if extra is not None:
            loss = loss + extra
        logs: Logs = {"loss": loss.detach(), "loss_x": loss_x.detach(), "loss_u": loss_u.detach(),
                      "mask_rate": mask.mean(), "lambda_u": torch.tensor(lam),
                      "thresholds": self.policy.thresholds().detach().clone()}
        accepted = mask.sum()
        mix = torch.zeros(self.num_classes, device=mask.device).scatter_add_(0, pseudo, mask.float())
        logs["pseudo_class_mix"] = mix / accepted.clamp_min(1.0)
        logs["accepted_per_class"] = mix
        if batch.get("y_u_true") is not None:
            known = (batch["y_u_true"] >= 0).float() * mask  # accepted samples whose truth is known
            hit = (pseudo == batch["y_u_true"]).float() * known
            logs["pseudo_acc"] = hit.sum() / known.sum().clamp_min(1.0)
            # Per class (by pseudo-label): accepted faces with known truth and the share right (-1: none).
            n_known = torch.zeros(self.num_classes, device=mask.device).scatter_add_(0, pseudo, known)
            n_hit = torch.zeros(self.num_classes, device=mask.device).scatter_add_(0, pseudo, hit)
            logs["pseudo_acc_per_class"] = torch.where(n_known > 0, n_hit / n_known.clamp_min(1.0),
                                                       torch.full_like(n_known, -1.0))
        return loss, logs


@ALGORITHMS.register("fixmatch")
class FixMatch(PseudoLabelAlgorithm):
    """FixMatch (Sohn et al., 2020): one fixed threshold tau."""


@ALGORITHMS.register("flexmatch")
class FlexMatch(PseudoLabelAlgorithm):
    """FlexMatch (Zhang et al., 2021): curriculum class-wise thresholds tau * M(beta(c))."""

    def make_policy(self, cfg: SSLConfig, num_classes: int, num_unlabeled: int | None) -> ThresholdPolicy:
        mode = resolve_status_mode(cfg.status_mode, num_unlabeled is not None)
        return THRESHOLDS.get("flexmatch")(num_classes, tau=cfg.tau, mode=mode, num_samples=num_unlabeled,
                                           momentum=cfg.status_momentum, warmup=cfg.threshold_warmup)


@ALGORITHMS.register("freematch")
class FreeMatch(PseudoLabelAlgorithm):
    """FreeMatch (Wang et al., 2023): self-adaptive thresholds plus optional fairness loss."""

    def make_policy(self, cfg: SSLConfig, num_classes: int, num_unlabeled: int | None) -> ThresholdPolicy:
        return THRESHOLDS.get("freematch")(num_classes, momentum=cfg.freematch_momentum)

    def extra_loss(self, logits_us: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        if self.cfg.fairness_weight <= 0:
            return None
        p = self.policy
        return self.cfg.fairness_weight * freematch_fairness_loss(logits_us, mask, p.p_model, p.label_hist)


@ALGORITHMS.register("dtm_flex")
class DTMFlex(PseudoLabelAlgorithm):
    """The first DTM reconstruction (sessions 1-3): FlexMatch status clipped to [tau_min, tau_max].

    Kept as a named, measured variant; the registered ``dtm`` is semifer.ssl.dtm_online.

    Stage schedule: steps < warmup_steps are supervised only (the unlabeled batch is
    not even drawn); then lambda_u ramps linearly over ramp_steps while class-wise
    thresholds clip(tau * M(beta_t(c)), tau_min, tau_max) select pseudo-labels.
    With ``ssl.distribution_alignment: true`` the teacher's probabilities are aligned to
    a target prior first (right when the unlabeled faces share the labeled set's classes,
    wrong for a skewed face-recognition prior; docs/method.md).
    """


    def make_policy(self, cfg: SSLConfig, num_classes: int, num_unlabeled: int | None) -> ThresholdPolicy:
        mode = resolve_status_mode(cfg.status_mode, num_unlabeled is not None)
        return THRESHOLDS.get("dtm_flex")(num_classes, tau=cfg.tau, tau_min=cfg.tau_min, tau_max=cfg.tau_max,
                                     mode=mode, num_samples=num_unlabeled, momentum=cfg.status_momentum,
                                     warmup=cfg.threshold_warmup, prior_correction=cfg.prior_correction,
                                     class_quantile=cfg.class_quantile, quantile_floor=cfg.quantile_floor,
                                     quantile_step=cfg.quantile_step)

    def unlabeled_weight(self, step: int) -> float:
        c = self.cfg
        if step < c.warmup_steps:
            return 0.0
        if c.ramp_steps <= 0:
            return c.lambda_u
        return c.lambda_u * min(1.0, (step - c.warmup_steps + 1) / c.ramp_steps)


def build_algorithm(cfg: SSLConfig, num_classes: int, labeled_counts: torch.Tensor,
                    num_unlabeled: int | None, imbalance: str = "none", label_smoothing: float = 0.0) -> Algorithm:
    """Instantiate the registered algorithm ``cfg.algorithm``."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"optim.label_smoothing must be in [0, 1), got {label_smoothing}")
    algo = ALGORITHMS.get(cfg.algorithm)(cfg, num_classes, labeled_counts, num_unlabeled, imbalance)
    algo.label_smoothing = label_smoothing
    return algo
