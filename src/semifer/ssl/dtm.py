"""DTM: per-class thresholds that hold each class's accepted pseudo-labels at a target precision.

The teacher's probabilities are first *calibrated* on a small held-out slice of the
labeled set (a temperature and a per-class logit bias, fitted by NLL with the EMA
teacher; re-fitted at every stage). Calibrated confidences q estimate the chance that a
pseudo-label is right, so the mean q of the faces a threshold accepts estimates the
*precision* of that class's accepted set. For each class c the threshold is the lowest
confidence at which that estimate still reaches the target precision pi (and never below
a floor: a pseudo-label must be more likely right than wrong):

    tau_t(c) = max(floor, min{ t : mean(q_i | pred_i = c, q_i >= t) >= pi })

and a class whose best faces cannot reach pi is closed (tau = 1). As the teacher learns a
class, its confident mass grows and its threshold falls; a class the teacher cannot yet
tell apart stays closed until it can. docs/method.md has the derivation and evidence.

Everything is in buffers (calibration, a per-class histogram of calibrated confidences,
the thresholds), so it checkpoints, moves devices and agrees across DDP ranks (batch
histograms are all-reduced; every rank fits the calibration on the same held-out logits).
"""
from __future__ import annotations

import torch
from torch import nn

from semifer import dist
from semifer.registry import THRESHOLDS
from semifer.ssl.thresholds import ThresholdPolicy


MAX_SHIFT = 3.0  # largest factor by which the label-shift correction may move a class's odds


def fit_calibration(logits: torch.Tensor, labels: torch.Tensor, num_classes: int, prior: float = 8.0,
                    iters: int = 100, bias_prior: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature T and per-class bias b minimising NLL of softmax(logits / T + b) on (logits, labels).

    A zero-mean Gaussian prior on b and log T, worth ``prior`` held-out faces, keeps the
    fit honest on small slices: the penalty is (prior / n) * (|b|^2 + (log T)^2) next to the
    mean NLL of n faces, so 16 held-out faces (the demo) barely move T and b away from the
    identity while 1,400 (FER2013 at 5 %) are fitted almost freely. Without it, 16 faces gave
    a bias of -0.7 against Neutral and T = 0.67, and the thresholds then let through
    pseudo-labels that were 10-35 % right at an estimated 80 %.
    ``bias_prior`` (default ``prior``) weighs the biases' prior alone: a class with a handful
    of held-out faces otherwise gets a bias fitted to them, which the unlabeled faces need not share.
    Runs on the CPU in float64 (C + 1 parameters).
    """
    z = logits.detach().double().cpu()
    y = labels.detach().long().cpu()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    if z.shape[0] == 0:
        return torch.ones(1), torch.zeros(num_classes)
    opt = torch.optim.LBFGS([log_t, bias], lr=0.5, max_iter=iters, line_search_fn="strong_wolfe")
    weight = prior / z.shape[0]
    bias_weight = (prior if bias_prior is None else bias_prior) / z.shape[0]

    def closure():
        opt.zero_grad()
        loss = (nn.functional.cross_entropy(z / log_t.exp() + bias, y) + bias_weight * (bias ** 2).sum()
                + weight * (log_t ** 2).sum())
        loss.backward()
        return loss

    opt.step(closure)
    # A held-out slice the teacher gets all right drives T toward 0 (NLL -> 0); such a T says
    # nothing about the unlabeled faces, so T stays within a plausible range.
    t = log_t.detach().exp().clamp(0.25, 10.0)
    return t.float(), bias.detach().float()


def tail_thresholds(count: torch.Tensor, conf_sum: torch.Tensor, target: float, floor: float,
                    held_count: torch.Tensor | None = None, held_right: torch.Tensor | None = None,
                    evidence: float = 0.0, side: str = "both") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class thresholds from (C, K) histograms of calibrated confidence (counts and sums of q).

    Returns (thresholds (C,), estimated precision of each class's accepted set (C,),
    share of all samples each class accepts (C,)). Bin k covers [k/K, (k+1)/K); a
    threshold is a bin's lower edge. Closed classes get threshold 1 and precision 0.

    With ``evidence`` a > 0 and the held-out slice's (C, K) histograms of predicted class and
    confidence (``held_count``: faces, ``held_right``: of them right), the estimate at each t is
    the mean of a Beta posterior whose prior is the calibrated estimate worth a faces, updated
    by the n held-out faces above t of which r are right: (a P + r) / (a + n). With ``side``
    "down" the posterior may only lower the estimate, min(P, (a P + r) / (a + n)): the held-out
    faces can veto a class the calibration trusts, never open one further than it does.
    """
    C, K = count.shape
    edges = torch.arange(K, dtype=count.dtype, device=count.device) / K
    n_tail = count.flip(1).cumsum(1).flip(1)            # samples with q >= edge k
    s_tail = conf_sum.flip(1).cumsum(1).flip(1)
    prec = s_tail / n_tail.clamp_min(1e-12)
    if evidence > 0 and held_count is not None and held_right is not None:
        hn = held_count.to(prec).flip(1).cumsum(1).flip(1)
        hr = held_right.to(prec).flip(1).cumsum(1).flip(1)
        post = (evidence * prec + hr) / (evidence + hn)
        prec = torch.minimum(prec, post) if side == "down" else post
    ok = (prec >= target) & (n_tail > 0) & (edges >= floor - 1e-9)
    # Lowest qualifying bin per class (K where none qualifies).
    idx = torch.where(ok, torch.arange(K, device=count.device).expand(C, K), torch.full_like(ok, K, dtype=torch.long))
    first = idx.min(dim=1).values
    open_ = first < K
    safe = first.clamp(max=K - 1)
    thr = torch.where(open_, edges[safe], torch.ones_like(edges[safe]))
    est = torch.where(open_, prec.gather(1, safe[:, None]).squeeze(1), torch.zeros_like(thr))
    share = torch.where(open_, n_tail.gather(1, safe[:, None]).squeeze(1), torch.zeros_like(thr))
    total = count.sum().clamp_min(1e-12)
    return thr, est, share / total


@THRESHOLDS.register("dtm")
class PrecisionThreshold(ThresholdPolicy):
    """DTM's policy: calibrated confidences and per-class precision-target thresholds.

    ``update(probs)`` folds a batch of teacher probabilities into an EMA (momentum ``m``)
    of the joint histogram of (calibrated class, calibrated confidence); ``set_histogram``
    replaces it with a whole pass over the unlabeled set (rounds). ``calibrate`` fits the
    temperature and biases on held-out teacher logits. Thresholds follow from the
    histogram at every update (O(C K) work).
    """

    update_before_mask = True

    def __init__(self, num_classes: int, target: float = 0.8, floor: float = 0.5, bins: int = 100,
                 momentum: float = 0.99, prior_shift: bool = True, holdout_evidence: float = 0.0,
                 evidence_side: str = "both", bias_prior: float = 8.0) -> None:
        super().__init__(num_classes)
        if not 0.0 < target <= 1.0 or not 0.0 <= floor < 1.0:
            raise ValueError(f"need 0 < target precision <= 1 and 0 <= floor < 1, got {target}, {floor}")
        self.target, self.floor, self.bins, self.momentum = float(target), float(floor), int(bins), float(momentum)
        self.register_buffer("temperature", torch.ones(1))
        self.register_buffer("bias", torch.zeros(num_classes))
        self.register_buffer("count", torch.zeros(num_classes, bins))
        self.register_buffer("conf_sum", torch.zeros(num_classes, bins))
        self.register_buffer("thr", torch.ones(num_classes))             # closed until the first histogram
        self.register_buffer("est_precision", torch.zeros(num_classes))
        self.register_buffer("accept_share", torch.zeros(num_classes))
        # -1 = no held-out face accepted for the class (not NaN: buffers must compare equal on resume)
        self.register_buffer("holdout_precision", torch.full((num_classes,), -1.0))
        self.register_buffer("calibrations", torch.zeros((), dtype=torch.long))
        # Label shift (Saerens et al., 2002): the unlabeled faces' class prior differs from the
        # held-out slice's, so calibrated probabilities are re-weighted by pi_u(c) / pi_l(c).
        self.prior_shift = bool(prior_shift)
        self.register_buffer("labeled_prior", torch.full((num_classes,), 1.0 / num_classes))
        self.register_buffer("unlabeled_prior", torch.full((num_classes,), 1.0 / num_classes))
        self.register_buffer("log_shift", torch.zeros(num_classes))
        # Held-out evidence (Beta posterior, tail_thresholds): the held-out slice's faces per
        # (predicted class, confidence bin) and how many of them are right. Registered only with
        # the option, so runs without it still resume.
        self.holdout_evidence = float(holdout_evidence)
        if self.holdout_evidence < 0:
            raise ValueError(f"holdout_evidence must be >= 0, got {holdout_evidence}")
        if evidence_side not in ("both", "down"):
            raise ValueError(f"evidence_side must be 'both' or 'down', got {evidence_side!r}")
        self.evidence_side = evidence_side
        if bias_prior < 0:
            raise ValueError(f"bias_prior must be >= 0 held-out faces, got {bias_prior}")
        self.bias_prior = float(bias_prior)
        if self.holdout_evidence > 0:
            self.register_buffer("held_count", torch.zeros(num_classes, bins))
            self.register_buffer("held_right", torch.zeros(num_classes, bins))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint made without holdout_evidence (a stage-0 checkpoint forked into a trial with
        # it) lacks the held-out histograms. Empty ones give exactly the thresholds it had (n = 0
        # leaves the calibrated estimate alone) until the next calibration fills them.
        if self.holdout_evidence > 0:
            for name in ("held_count", "held_right"):
                state_dict.setdefault(prefix + name, torch.zeros_like(getattr(self, name)))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- calibration -------------------------------------------------------------------
    def calibrated(self, probs: torch.Tensor, shift: bool = True) -> torch.Tensor:
        """softmax(log p / T + b + log(pi_u / pi_l)): the teacher's probabilities, calibrated
        on the held-out slice and moved to the unlabeled faces' class prior (``shift``)."""
        logp = probs.float().clamp_min(1e-12).log()
        z = logp / self.temperature + self.bias
        return (z + self.log_shift if shift else z).softmax(dim=1)

    def _set_shift(self, prior: torch.Tensor) -> None:
        present = self.labeled_prior > 0
        self.unlabeled_prior.copy_(prior)
        # Bounded: EM with a weak teacher can run away toward the classes it over-predicts.
        ratio = (prior.clamp_min(1e-6) / self.labeled_prior.clamp_min(1e-6)).clamp(1 / MAX_SHIFT, MAX_SHIFT)
        self.log_shift.copy_(torch.where(present, ratio.log(), torch.zeros_like(ratio)))

    @torch.no_grad()
    def adapt_prior(self, probs: torch.Tensor, iters: int = 30) -> None:
        """EM estimate of the unlabeled class prior from a whole pass of teacher probabilities."""
        if not self.prior_shift:
            return
        q0 = self.calibrated(probs, shift=False)
        prior = self.labeled_prior.clone()
        for _ in range(iters):
            w = torch.where(self.labeled_prior > 0,
                            (prior / self.labeled_prior.clamp_min(1e-6)).clamp(1 / MAX_SHIFT, MAX_SHIFT),
                            torch.zeros_like(prior))
            q = q0 * w
            q = q / q.sum(1, keepdim=True).clamp_min(1e-12)
            prior = q.mean(0)
        self._set_shift(prior)

    @torch.no_grad()
    def calibrate(self, holdout_logits: torch.Tensor, holdout_labels: torch.Tensor) -> None:
        """Fit T and b on the held-out slice; record each class's held-out precision at its threshold."""
        t, b = fit_calibration(holdout_logits, holdout_labels, self.num_classes, bias_prior=self.bias_prior)
        self.temperature.copy_(t.to(self.temperature.device))
        self.bias.copy_(b.to(self.bias.device))
        counts = torch.bincount(holdout_labels.long().cpu(), minlength=self.num_classes)[:self.num_classes].float()
        self.labeled_prior.copy_((counts / counts.sum().clamp_min(1.0)).to(self.labeled_prior.device))
        if int(self.calibrations) == 0:
            self.unlabeled_prior.copy_(self.labeled_prior)
        self._set_shift(self.unlabeled_prior)
        self.calibrations += 1
        self._holdout = (holdout_logits.detach().float().cpu(), holdout_labels.detach().long().cpu())
        self._refresh_holdout()

    def _refresh_holdout(self) -> None:
        held = getattr(self, "_holdout", None)
        if held is None:
            return
        q = self.calibrated(held[0].softmax(1).to(self.bias.device))
        conf, pred = q.max(1)
        acc = conf >= self.thr[pred]
        right = (pred.cpu() == held[1]).float()
        if self.holdout_evidence > 0:
            b = (conf * self.bins).long().clamp_(0, self.bins - 1)
            flat = (pred * self.bins + b).cpu()
            size = self.num_classes * self.bins
            n = torch.zeros(size).scatter_add_(0, flat, torch.ones(len(flat)))
            r = torch.zeros(size).scatter_add_(0, flat, right)
            self.held_count.copy_(n.view(self.num_classes, self.bins))
            self.held_right.copy_(r.view(self.num_classes, self.bins))
        for c in range(self.num_classes):
            sel = acc.cpu() & (pred.cpu() == c)
            self.holdout_precision[c] = right[sel].mean() if sel.any() else -1.0

    # -- histogram and thresholds ----------------------------------------------------------
    def _histogram(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        conf, pred = q.max(dim=1)
        b = (conf * self.bins).long().clamp_(0, self.bins - 1)
        flat = pred * self.bins + b
        n = torch.zeros(self.num_classes * self.bins, device=q.device).scatter_add_(0, flat, torch.ones_like(conf))
        s = torch.zeros(self.num_classes * self.bins, device=q.device).scatter_add_(0, flat, conf)
        return n.view(self.num_classes, self.bins), s.view(self.num_classes, self.bins)

    def refresh(self) -> None:
        held = (self.held_count, self.held_right) if self.holdout_evidence > 0 else (None, None)
        thr, est, share = tail_thresholds(self.count, self.conf_sum, self.target, self.floor, *held,
                                          evidence=self.holdout_evidence, side=self.evidence_side)
        self.thr.copy_(thr)
        self.est_precision.copy_(est)
        self.accept_share.copy_(share)

    @torch.no_grad()
    def update(self, probs: torch.Tensor, index: torch.Tensor | None = None) -> None:
        q = self.calibrated(probs.detach())
        n, s = self._histogram(q)
        stats = dist.all_reduce_sum(torch.stack([n, s]))
        total = stats[0].sum().clamp_min(1.0)
        m = self.momentum
        if self.prior_shift and int(self.calibrations) > 0:
            # One online EM step per batch: the running mean of the shifted probabilities.
            mean_q = dist.all_reduce_mean(q.mean(0))
            self._set_shift(self.unlabeled_prior * m + mean_q * (1 - m))
        self.count.mul_(m).add_(stats[0] / total, alpha=1 - m)
        self.conf_sum.mul_(m).add_(stats[1] / total, alpha=1 - m)
        self.refresh()

    @torch.no_grad()
    def set_histogram(self, q: torch.Tensor) -> None:
        """Replace the histogram with calibrated probabilities ``q`` of a whole unlabeled pass."""
        n, s = self._histogram(q.float())
        total = n.sum().clamp_min(1.0)
        self.count.copy_(n / total)
        self.conf_sum.copy_(s / total)
        self.refresh()
        self._refresh_holdout()

    def thresholds(self) -> torch.Tensor:
        return self.thr

    def mask(self, probs: torch.Tensor, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.calibrated(probs)
        conf, pseudo = q.max(dim=1)
        thr = self.thr[pseudo]
        return ((conf >= thr) & (thr < 1.0)).to(probs.dtype), pseudo
