"""Confidence-threshold policies: which pseudo-labels are trusted.

Every policy is an ``nn.Module`` whose whole memory is registered buffers, so it
is saved with the checkpoint, moves with ``.to(device)`` and stays identical on
all DDP ranks (per-batch statistics are all-reduced or all-gathered before they
touch a buffer). Updates are a few tensor ops on the batch and O(C) work on
the class vector: no loop over the unlabeled set, no ``.item()``, no host sync.

Contract: ``update(probs, index)`` and ``mask(probs) -> (mask, pseudo_labels)``, in the order
given by the policy's ``update_before_mask``;
``thresholds()`` gives the current per-class threshold vector for logging.
The formulas are written out in docs/method.md.
"""
from __future__ import annotations

import torch
from torch import nn

from semifer import dist
from semifer.registry import THRESHOLDS


class ThresholdPolicy(nn.Module):
    """Base class: a per-class threshold vector applied to the teacher's argmax class.

    ``update_before_mask``: whether a step absorbs the batch before masking it (FixMatch,
    FreeMatch, as in USB) or masks with the previous step's state first (FlexMatch, DTM).
    """

    update_before_mask = True

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def update(self, probs: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Absorb one batch of teacher probabilities (B, C); ``index`` = dataset indices or None."""

    def thresholds(self) -> torch.Tensor:
        raise NotImplementedError

    def mask(self, probs: torch.Tensor, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Float mask (B,) of accepted samples and the pseudo-labels (B,) (argmax class)."""
        conf, pseudo = probs.max(dim=1)
        thr = self.thresholds().to(conf.dtype)[pseudo]
        return (conf >= thr).to(probs.dtype), pseudo


@THRESHOLDS.register("fixed")
class FixedThreshold(ThresholdPolicy):
    """FixMatch: one constant threshold ``tau`` for every class and step."""

    def __init__(self, num_classes: int, tau: float = 0.95) -> None:
        super().__init__(num_classes)
        self.register_buffer("tau", torch.full((num_classes,), float(tau)))

    def thresholds(self) -> torch.Tensor:
        return self.tau


class LearningStatus(nn.Module):
    """Per-class learning status sigma(c): how many unlabeled samples the teacher is confident about.

    ``indexed`` mode (dataset indices known) keeps, per sample, the last class it was
    predicted with confidence > tau (-1 = never), exactly as FlexMatch does, plus the
    running histogram ``counts`` of that vector (slot 0 = never confident), updated
    incrementally from the batch so no step costs O(N).
    ``streamed`` mode (no index, millions of faces) keeps an EMA, with momentum ``m``,
    of the per-batch fractions of confident predictions per class (slot 0 = not confident).
    Both also track the teacher's predicted class distribution ``pi(c)`` (argmax at any
    confidence: last prediction per sample, or an EMA of batch fractions), which the
    prior-corrected status of DTM divides by.
    """

    def __init__(self, num_classes: int, mode: str, num_samples: int | None = None,
                 momentum: float = 0.999) -> None:
        super().__init__()
        if mode not in ("indexed", "streamed"):
            raise ValueError(f"learning-status mode must be 'indexed' or 'streamed', not {mode!r}")
        if mode == "indexed" and not num_samples:
            raise ValueError("indexed learning status needs the number of unlabeled samples")
        self.mode = mode
        self.momentum = float(momentum)
        if mode == "indexed":
            self.register_buffer("selected", torch.full((num_samples,), -1, dtype=torch.long))
            self.register_buffer("last_pred", torch.full((num_samples,), -1, dtype=torch.long))
            counts = torch.zeros(num_classes + 1, dtype=torch.long)
            counts[0] = num_samples
            self.register_buffer("counts", counts)
            self.register_buffer("pred_counts", counts.clone())
        else:
            status = torch.zeros(num_classes + 1)
            status[0] = 1.0
            self.register_buffer("status", status)
            self.register_buffer("pred_status", status.clone())

    @staticmethod
    def _move(values: torch.Tensor, hist: torch.Tensor, index: torch.Tensor, new: torch.Tensor,
              write: torch.Tensor | None = None) -> None:
        """``values[index] = new`` where ``write`` (default: everywhere), in batch order, and the histogram moved with it.

        ``hist`` counts ``values`` (slot = value + 1). A batch may repeat an index (the step
        sampler tiles a set smaller than one global batch), so the result must be that of
        sequential assignment: per index, the last writing occurrence wins, and only that one
        moves a unit in ``hist``. Found with one sort of B keys and a binary search, all
        fixed-size tensors: O(B log B), no host sync, deterministic.
        """
        b = index.numel()
        pos = torch.arange(b, device=index.device)
        writer = pos if write is None else torch.where(write, pos, torch.full_like(pos, -1))
        # key orders by index, then by writing position (-1 = does not write) within an index
        key, _ = torch.sort(index * (b + 1) + (writer + 1))
        last = torch.searchsorted(torch.div(key, b + 1, rounding_mode="floor"), index, right=True) - 1
        winner = key[last] % (b + 1) - 1          # batch position of this index's last writer, -1 if none
        old = values[index]
        values[index] = torch.where(winner >= 0, new[winner.clamp_min(0)], old)  # equal for all copies
        step = (winner == pos).to(hist.dtype)      # one unit per written index
        hist.scatter_add_(0, old + 1, -step)
        hist.scatter_add_(0, new + 1, step)

    def _ema(self, buf: torch.Tensor, slots: torch.Tensor) -> None:
        frac = torch.zeros_like(buf).scatter_add_(0, slots, torch.ones_like(slots, dtype=buf.dtype))
        frac = dist.all_reduce_mean(frac / max(slots.numel(), 1))
        buf.mul_(self.momentum).add_(frac, alpha=1.0 - self.momentum)

    @torch.no_grad()
    def update(self, conf: torch.Tensor, pred: torch.Tensor, tau: float, index: torch.Tensor | None) -> None:
        confident = conf > tau
        if self.mode == "indexed":
            if index is None:
                raise ValueError("indexed learning status needs the unlabeled batch's dataset indices")
            # Every rank applies the same gathered batch, so the buffers stay identical.
            index = dist.all_gather_cat(index.to(self.selected.device))
            pred = dist.all_gather_cat(pred)
            confident = dist.all_gather_cat(confident)
            self._move(self.selected, self.counts, index, pred, write=confident)
            self._move(self.last_pred, self.pred_counts, index, pred)
        else:
            self._ema(self.status, torch.where(confident, pred + 1, torch.zeros_like(pred)))
            self._ema(self.pred_status, pred + 1)

    def sigma(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-class status (C,), never/not-confident mass (scalar)) as fractions of the unlabeled set."""
        s = self.counts.float() / self.counts.sum() if self.mode == "indexed" else self.status
        return s[1:], s[0]

    def predicted_prior(self) -> torch.Tensor:
        """pi(c): fraction of the unlabeled set the teacher assigns to class c (any confidence)."""
        p = self.pred_counts.float() / self.pred_counts.sum() if self.mode == "indexed" else self.pred_status
        return p[1:]

    def beta(self, warmup: bool, prior_correction: bool = False) -> torch.Tensor:
        """Normalised status beta(c) in [0, 1]; with ``warmup`` the unused mass joins the max.

        With ``prior_correction`` sigma(c) is first divided by pi(c), turning "how many
        faces are confidently class c" into "what fraction of the faces predicted as c are
        confident", which no longer grows with the class's frequency in the unlabeled set.
        """
        sigma, unused = self.sigma()
        if prior_correction:
            pi = self.predicted_prior()
            sigma = torch.where(pi > 0, sigma / pi.clamp_min(1e-12), torch.zeros_like(sigma)).clamp(max=1.0)
        denom = torch.maximum(sigma.max(), unused) if warmup else sigma.max()
        return sigma / denom.clamp_min(1e-12)


def resolve_status_mode(mode: str, has_index: bool) -> str:
    """'auto' -> 'indexed' when the unlabeled source has per-sample indices, else 'streamed'."""
    if mode == "auto":
        return "indexed" if has_index else "streamed"
    if mode == "indexed" and not has_index:
        raise ValueError("status_mode 'indexed' needs an indexed unlabeled source; use 'streamed'")
    return mode


def convex_map(beta: torch.Tensor) -> torch.Tensor:
    """FlexMatch's mapping M(beta) = beta / (2 - beta): low status lowers the threshold quickly."""
    return beta / (2.0 - beta)


@THRESHOLDS.register("flexmatch")
class FlexMatchThreshold(ThresholdPolicy):
    """FlexMatch curriculum thresholds: tau_t(c) = tau * M(beta_t(c)).

    As USB's FlexMatchThresholdingHook, a step masks with the previous step's status, then
    updates it with the batch.
    """

    update_before_mask = False

    def __init__(self, num_classes: int, tau: float = 0.95, mode: str = "indexed",
                 num_samples: int | None = None, momentum: float = 0.999, warmup: bool = True) -> None:
        super().__init__(num_classes)
        self.tau = float(tau)
        self.warmup = bool(warmup)
        self.status = LearningStatus(num_classes, mode, num_samples, momentum)

    def update(self, probs: torch.Tensor, index: torch.Tensor | None = None) -> None:
        conf, pred = probs.detach().max(dim=1)
        self.status.update(conf, pred, self.tau, index)

    def thresholds(self) -> torch.Tensor:
        return self.tau * convex_map(self.status.beta(self.warmup))


@THRESHOLDS.register("dtm_flex")
class DynamicThreshold(FlexMatchThreshold):
    """DTM (reconstruction): class- and stage-dependent thresholds kept in [tau_min, tau_max].

    tau_t(c) = clip(tau * M(beta_t(c)), tau_min, tau_max). The floor stops the early,
    untrained teacher from flooding the student with wrong labels (FlexMatch starts at
    threshold 0); the ceiling keeps well-learned classes from starving.
    The stage schedule (supervised warm-up, then thresholds active) is applied by the
    DTM algorithm, which only calls this policy after the warm-up.
    """

    def __init__(self, num_classes: int, tau: float = 0.95, tau_min: float = 0.7, tau_max: float = 0.95,
                 mode: str = "streamed", num_samples: int | None = None, momentum: float = 0.999,
                 warmup: bool = True, prior_correction: bool = True, class_quantile: float = 0.0,
                 quantile_floor: float = 0.5, quantile_step: float = 0.005) -> None:
        super().__init__(num_classes, tau, mode, num_samples, momentum, warmup)
        self.prior_correction = bool(prior_correction)
        if not 0.0 <= tau_min <= tau_max <= 1.0:
            raise ValueError(f"need 0 <= tau_min <= tau_max <= 1, got {tau_min}, {tau_max}")
        if not 0.0 <= class_quantile < 1.0 or (class_quantile > 0 and not 0.0 <= quantile_floor <= tau_min):
            raise ValueError(f"need 0 <= class_quantile < 1 and 0 <= quantile_floor <= tau_min, "
                             f"got {class_quantile}, {quantile_floor}")
        self.tau_min = float(tau_min)
        self.tau_max = float(tau_max)
        self.class_quantile = float(class_quantile)
        self.quantile_floor = float(quantile_floor)
        self.quantile_step = float(quantile_step)
        if self.class_quantile > 0:
            # Running estimate of the confidence above which `class_quantile` of each class's
            # predictions lie (Robbins-Monro quantile tracking; docs/method.md).
            self.register_buffer("quantile", torch.full((num_classes,), float(tau_max)))

    @torch.no_grad()
    def update(self, probs: torch.Tensor, index: torch.Tensor | None = None) -> None:
        super().update(probs, index)
        if self.class_quantile <= 0:
            return
        conf, pred = probs.detach().float().max(dim=1)
        n = torch.zeros_like(self.quantile).scatter_add_(0, pred, torch.ones_like(conf))
        above = torch.zeros_like(self.quantile).scatter_add_(0, pred, (conf > self.quantile[pred]).float())
        n, above = dist.all_reduce_sum(torch.stack([n, above]))
        step = self.quantile_step * (above / n.clamp_min(1.0) - self.class_quantile)
        self.quantile.add_(torch.where(n > 0, step, torch.zeros_like(step))).clamp_(0.0, 1.0)

    def thresholds(self) -> torch.Tensor:
        beta = self.status.beta(self.warmup, self.prior_correction)
        thr = (self.tau * convex_map(beta)).clamp(self.tau_min, self.tau_max)
        if self.class_quantile > 0:
            # Every class keeps at least its most confident `class_quantile` share, down to the floor.
            thr = torch.minimum(thr, self.quantile.clamp(min=self.quantile_floor))
        return thr


@THRESHOLDS.register("freematch")
class FreeMatchThreshold(ThresholdPolicy):
    """FreeMatch self-adaptive thresholds: tau_t(c) = tau_t * MaxNorm(p_t)(c).

    tau_t is an EMA of the mean max-probability, p_t an EMA of the mean probability
    vector, h_t an EMA of the histogram of argmax classes (used by the fairness loss).
    """

    def __init__(self, num_classes: int, momentum: float = 0.999) -> None:
        super().__init__(num_classes)
        self.momentum = float(momentum)
        self.register_buffer("time_p", torch.tensor(1.0 / num_classes))
        self.register_buffer("p_model", torch.full((num_classes,), 1.0 / num_classes))
        self.register_buffer("label_hist", torch.full((num_classes,), 1.0 / num_classes))

    @torch.no_grad()
    def update(self, probs: torch.Tensor, index: torch.Tensor | None = None) -> None:
        probs = probs.detach().float()
        conf, pred = probs.max(dim=1)
        hist = torch.zeros_like(self.label_hist).scatter_add_(0, pred, torch.ones_like(conf)) / conf.numel()
        stats = dist.all_reduce_mean(torch.cat([conf.mean().view(1), probs.mean(dim=0), hist]))
        m = self.momentum
        self.time_p.mul_(m).add_(stats[0], alpha=1 - m)
        self.p_model.mul_(m).add_(stats[1:1 + self.num_classes], alpha=1 - m)
        self.label_hist.mul_(m).add_(stats[1 + self.num_classes:], alpha=1 - m)

    def thresholds(self) -> torch.Tensor:
        return self.time_p * self.p_model / self.p_model.max()
