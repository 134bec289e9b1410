"""DTM in rounds: offline self-training at the cost of plain supervised training.

Stage 0 (``ssl.warmup_steps``) is supervised. Then ``ssl.rounds`` rounds split the remaining
steps evenly; at the start of each round the EMA teacher (the student of the round before)
labels the whole in-memory unlabeled set once (mirror-averaged logits), DTM's calibration is
re-fitted on the held-out labeled slice, and DTM's per-class precision-target thresholds
decide which faces are accepted. Inside a round every step draws ``mu x batch`` accepted
faces (class-balanced by default, so a rare class's few trusted faces are not drowned by
happy ones), strongly augmented, next to the usual weak labeled batch:

    loss = CE(labeled) + lambda_u * mean_i CE(student(strong(u_i)), target_i)

with hard (argmax) or soft (calibrated probabilities) targets. With ``ssl.stream_prior_correction``
the pseudo-label term uses ``logits + log(s / pi)`` instead (logit adjustment): s = the class mix
the round's draws have, pi = the labeled prior. The draws over-represent the classes the teacher
trusts; without the correction every class the round barely accepts loses prior mass in the
student (round 0 accepts almost no fear, sadness or disgust). No teacher forward and no
second view per step, so a step costs what a supervised step on (1 + mu) x batch images
costs. With ``ssl.round_consistency`` = w > 0, half of the unlabeled batch is drawn uniformly
from all unlabeled faces instead, and those faces add FixMatch's term (EMA teacher on the weak
view, fixed threshold ``ssl.tau``): + w * mean_j 1[max p_j >= tau] CE(student(strong(u_j)), argmax p_j),
so the faces no round accepts still shape the student. The labels of a round live in buffers (``targets``, ``accepted``, ``round``), so a
run resumed mid-round continues with exactly the same pseudo-labels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from semifer.config import SSLConfig
from semifer.labels import ABAW_LABELS
from semifer.registry import ALGORITHMS
from semifer.ssl.algorithms import Algorithm, Logs
from semifer.ssl.context import StepContext
from semifer.ssl.dtm import PrecisionThreshold


def round_of(step: int, warmup: int, total: int, rounds: int) -> int:
    """Round index of ``step`` (-1 during the supervised stage 0)."""
    if step < warmup or rounds <= 0:
        return -1
    length = max(1, (total - warmup) // rounds)
    return min((step - warmup) // length, rounds - 1)


def balanced_weights(pred: torch.Tensor, accepted: torch.Tensor, num_classes: int, max_oversample: float) -> torch.Tensor:
    """Per-sample draw weights: every open class an equal share, but no face drawn more than
    ``max_oversample`` times as often as uniform sampling over the accepted faces would.

    Class share s_c = min(1 / #open classes, k * n_c / N) (then renormalised), spread evenly over
    the class's n_c accepted faces. Without the cap a class with one accepted face would put
    that one face into 1/C of every batch.
    """
    n = torch.bincount(pred[accepted], minlength=num_classes)[:num_classes].float()
    total = n.sum().clamp_min(1.0)
    open_ = n > 0
    share = torch.minimum(torch.full_like(n, 1.0 / max(int(open_.sum()), 1)), max_oversample * n / total)
    share = torch.where(open_, share, torch.zeros_like(share))
    per_sample = share / n.clamp_min(1.0)
    return torch.where(accepted, per_sample[pred.clamp_min(0)], torch.zeros(accepted.shape))


def quota_thresholds(conf: torch.Tensor, pred: torch.Tensor, thr: torch.Tensor, quota: torch.Tensor) -> torch.Tensor:
    """Per-class thresholds raised where a class would accept more than ``quota[c]`` faces: to the
    confidence of its ``quota[c]``-th most confident face (ties may let a few more through); a
    quota of 0 closes the class (threshold 1)."""
    out = thr.clone()
    for c in range(thr.numel()):
        q = conf[(pred == c) & (conf >= thr[c])]
        k = int(quota[c])
        if thr[c] < 1.0 and q.numel() > k:
            out[c] = torch.topk(q, k).values[-1] if k >= 1 else 1.0
    return out


def evidence_scale(holdout_labels: torch.Tensor, num_classes: int, k: int) -> torch.Tensor:
    """Per-class quota factor min(1, n_c / k), n_c = the class's faces in the held-out slice: a
    class the slice barely holds (FER2013 5 %: two disgust faces) has an unchecked precision
    estimate, so it may accept only a share of its quota."""
    n = torch.bincount(holdout_labels.long().cpu().clamp_min(0), minlength=num_classes)[:num_classes].float()
    return (n / k).clamp(max=1.0)


def mixup_weights(alpha: float, step: int, idx: torch.Tensor) -> torch.Tensor:
    """Per-face mixing weights max(l, 1 - l), l ~ Beta(alpha, alpha), (B,): drawn from a generator
    seeded by the step and the batch's face indices, so a resumed run (and each DDP rank) draws
    exactly what the uninterrupted run drew."""
    import numpy as np

    from semifer.data.imageset import _mix

    rng = np.random.default_rng(_mix(step, len(idx), *idx[:8].tolist(), 0x3D))
    lam = torch.from_numpy(rng.beta(alpha, alpha, size=len(idx))).float()
    return torch.maximum(lam, 1 - lam)


def mix_pairs(x: torch.Tensor, target: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each face mixed with the next one of the batch (the batch is a random draw, so that is a
    random partner) and its target likewise; ``lam`` >= 0.5 keeps each face the larger part."""
    lam = lam.to(x.device)
    lx = lam.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    mixed = lx * x + (1 - lx) * x.roll(1, 0)
    return mixed, lam[:, None] * target + (1 - lam[:, None]) * target.roll(1, 0)


@ALGORITHMS.register("dtm_rounds")
class DTMRounds(Algorithm):
    """Self-training in rounds with DTM thresholds (docs/method.md, "DTM in rounds")."""

    uses_unlabeled = True
    uses_holdout = True
    unlabeled_views = ("strong",)

    def __init__(self, cfg: SSLConfig, num_classes: int, labeled_counts: torch.Tensor,
                 num_unlabeled: int | None = None, imbalance: str = "none") -> None:
        super().__init__(cfg, num_classes, labeled_counts, num_unlabeled, imbalance)
        if num_unlabeled is None:
            raise ValueError("dtm_rounds labels an in-memory unlabeled set once per round; streamed sources "
                             "(wds:/recordio:/list:/stream:) need the online 'dtm' or `semifer pseudolabel`")
        if cfg.rounds < 1:
            raise ValueError(f"ssl.rounds must be >= 1 for dtm_rounds, got {cfg.rounds}")
        if cfg.evidence_quota < 0 or (cfg.evidence_quota > 0 and cfg.max_class_share <= 0):
            raise ValueError("ssl.evidence_quota (k >= 0) scales the per-class quota: it needs max_class_share > 0")
        self.policy = PrecisionThreshold(num_classes, cfg.target_precision, cfg.precision_floor, cfg.hist_bins,
                                         prior_shift=cfg.prior_shift,
                                         holdout_evidence=cfg.holdout_evidence,
                                         evidence_side=cfg.holdout_evidence_side,
                                         bias_prior=cfg.calibration_bias_prior)
        self.register_buffer("round", torch.full((), -1, dtype=torch.long))
        self.register_buffer("targets", torch.zeros(num_unlabeled, num_classes, dtype=torch.float16))
        self.register_buffer("accepted", torch.zeros(num_unlabeled, dtype=torch.bool))
        self.register_buffer("pseudo", torch.full((num_unlabeled,), -1, dtype=torch.long))
        if cfg.round_partition:
            # which round labels each face (a fixed random split, so resume and DDP ranks agree)
            part = torch.randperm(num_unlabeled, generator=torch.Generator().manual_seed(20231)) % cfg.rounds
            self.register_buffer("part", part.to(torch.int8))
        if cfg.stream_prior_correction:
            # log(s_c / pi_c) of the current round; only with the option, so older runs still resume
            self.register_buffer("stream_log_ratio", torch.zeros(num_classes))
        self.unlabeled = None
        self.holdout = None
        if cfg.round_consistency > 0:
            self.unlabeled_views = ("weak", "strong")
        if not 0.0 <= cfg.round_ensemble < 1.0:
            raise ValueError(f"ssl.round_ensemble must be in [0, 1), got {cfg.round_ensemble}")
        if cfg.pseudo_mixup < 0:
            raise ValueError(f"ssl.pseudo_mixup must be >= 0 (0 = off), got {cfg.pseudo_mixup}")
        if cfg.pseudo_mixup > 0 and cfg.round_consistency > 0:
            raise ValueError("ssl.pseudo_mixup mixes the accepted faces of a batch; it does not combine with "
                             "round_consistency, whose batch is half uniform draws")
        if cfg.round_ensemble > 0 and (cfg.pseudo_targets != "soft" or cfg.round_partition):
            raise ValueError("ssl.round_ensemble averages the rounds' soft targets over every face: it needs "
                             "pseudo_targets: soft and no round_partition")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Buffers that exist only with an option, missing from a checkpoint made without it (a
        # stage-0 checkpoint forked into a trial that turns the option on): the fixed partition is
        # rebuilt as constructed; the stream correction stays zero (as the checkpoint's run trained)
        # until the next round computes it.
        for name in ("part", "stream_log_ratio"):
            if hasattr(self, name):
                state_dict.setdefault(prefix + name, getattr(self, name).detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def bind(self, unlabeled=None, holdout=None) -> None:
        if unlabeled is None:
            raise ValueError("dtm_rounds labels an in-memory unlabeled set once per round; streamed sources "
                             "(wds:/recordio:/list:/stream:) need the online 'dtm' or `semifer pseudolabel`")
        if holdout is None or len(holdout) == 0:
            raise ValueError("dtm_rounds calibrates on a held-out labeled slice: set ssl.holdout_fraction > 0")
        self.unlabeled, self.holdout = unlabeled, holdout

    def unlabeled_weight(self, step: int) -> float:
        return self.cfg.lambda_u if int(self.round) >= 0 and bool(self.accepted.any()) else 0.0

    def wants_unlabeled(self, step: int) -> bool:
        return self.unlabeled_weight(step) > 0

    def holdout_released(self, step: int, total_steps: int) -> bool:
        # The last round's calibration runs in before_step at its first step, before this is asked.
        last = self.cfg.rounds - 1
        return self.cfg.holdout_rejoin and round_of(step, self.cfg.warmup_steps, total_steps, self.cfg.rounds) == last

    # -- the round boundary ------------------------------------------------------------------
    @torch.no_grad()
    def before_step(self, step: int, ctx: StepContext) -> None:
        r = round_of(step, self.cfg.warmup_steps, ctx.total_steps, self.cfg.rounds)
        if r < 0 or r == int(self.round):
            return
        if self.unlabeled is None or self.holdout is None:
            raise RuntimeError("dtm_rounds needs bind(unlabeled=..., holdout=...) before training")
        flip = self.cfg.label_flip
        held = ctx.logits(self.holdout.images, flip=flip)
        self.policy.calibrate(held, self.holdout.labels)
        probs = ctx.logits(self.unlabeled.images, flip=flip).softmax(1).to(self.targets.device)
        self.policy.adapt_prior(probs)
        q = self.policy.calibrated(probs)
        if self.cfg.round_ensemble > 0 and int(self.round) >= 0:
            # soft targets hold the previous round's (averaged) calibrated probabilities of every face
            a = self.cfg.round_ensemble
            q = (1 - a) * q + a * self.targets.to(q.device, q.dtype)
        # round_partition: only this round's part is labeled (faces the teacher never trained on)
        fresh = (self.part.to(q.device) == r) if self.cfg.round_partition else torch.ones(len(q), dtype=torch.bool, device=q.device)
        self.policy.set_histogram(q[fresh])
        conf, pred = q.max(1)
        thr = self.policy.thresholds()
        if self.cfg.max_class_share > 0:
            prior = self.labeled_counts.float().cpu()
            quota = self.cfg.max_class_share * prior / prior.sum().clamp_min(1) * int(fresh.sum())
            if self.cfg.evidence_quota > 0:
                quota = quota * evidence_scale(self.holdout.labels, self.num_classes, self.cfg.evidence_quota)
            quota = quota.floor()
            f = fresh.cpu()
            capped = quota_thresholds(conf.cpu()[f], pred.cpu()[f], thr.cpu(), quota).to(thr.device)
            if not torch.equal(capped, thr):
                raised = capped > thr
                acc_c = (conf[:, None] >= capped) & (pred[:, None] == torch.arange(self.num_classes, device=pred.device)) & fresh[:, None]
                est = (acc_c * conf[:, None]).sum(0) / acc_c.sum(0).clamp_min(1)
                self.policy.est_precision.copy_(torch.where(raised.to(est.device), est, self.policy.est_precision))
                self.policy.thr.copy_(capped)
                thr = capped
        accepted = (conf >= thr[pred]) & (thr[pred] < 1.0) & fresh
        if self.cfg.pseudo_targets == "soft":
            targets = q
        else:
            targets = F.one_hot(pred, self.num_classes).float()
        if self.cfg.round_partition:
            # earlier rounds' accepted faces keep their labels; the rest of the other parts stay out
            keep = self.accepted.clone()
            targets = torch.where(keep[:, None], self.targets.float(), targets.to(self.targets.device))
            pred = torch.where(keep, self.pseudo, pred.to(self.pseudo.device))
            accepted = keep | accepted.to(keep.device)
        self.targets.copy_(targets.to(self.targets.dtype))
        self.accepted.copy_(accepted)
        self.pseudo.copy_(pred)
        self.round.fill_(r)
        if self.cfg.stream_prior_correction:
            self.stream_log_ratio.copy_(self.stream_correction().to(self.stream_log_ratio.device))
        ctx.log(self.round_record(step, r))

    def round_record(self, step: int, r: int) -> dict:
        """One ``kind: round`` record: per class threshold, accepted count, estimated and known precision."""
        C = self.num_classes
        acc, pred = self.accepted.cpu(), self.pseudo.cpu()
        counts = torch.bincount(pred[acc], minlength=C)[:C]
        rec = {"kind": "round", "step": step, "round": r, "accepted": int(acc.sum()), "unlabeled": int(acc.numel()),
               "thresholds": self.policy.thresholds().tolist(), "accepted_per_class": counts.tolist(),
               "est_precision": self.policy.est_precision.tolist(),
               "holdout_precision": [None if v < 0 else v for v in self.policy.holdout_precision.tolist()],
               "temperature": float(self.policy.temperature),
               "unlabeled_prior": self.policy.unlabeled_prior.tolist()}
        truth = getattr(self.unlabeled, "true_labels", None)
        if truth is not None:
            known = acc & (truth >= 0)
            right = known & (pred == truth)
            nk = torch.bincount(pred[known], minlength=C)[:C].float()
            nr = torch.bincount(pred[right], minlength=C)[:C].float()
            rec["accepted_known"] = nk.long().tolist()
            rec["accepted_accuracy"] = torch.where(nk > 0, nr / nk.clamp_min(1), torch.full_like(nk, float("nan"))).tolist()
            rec["accepted_accuracy_all"] = float(nr.sum() / nk.sum().clamp_min(1))
        rec["classes"] = list(ABAW_LABELS[:C])
        return rec

    def draw_weights(self) -> torch.Tensor:
        """Per-face probability weights of the round's draws (0 for faces not accepted)."""
        acc, pred = self.accepted.cpu(), self.pseudo.cpu()
        if self.cfg.pseudo_sampling == "class_balanced":
            return balanced_weights(pred, acc, self.num_classes, self.cfg.max_oversample)
        return acc.float()

    def stream_correction(self, floor: float = 1e-4) -> torch.Tensor:
        """log(s_c / pi_c): s = the expected class mix of the round's draws, pi = the labeled prior.

        A class with no accepted face gets s = ``floor``: its logit is pushed far down inside the
        pseudo-label term, so that term neither trains it up nor (through the softmax) down.
        """
        w = self.draw_weights()
        C = self.num_classes
        s = torch.zeros(C).index_add_(0, self.pseudo.cpu().clamp_min(0), w)
        s = (s / s.sum().clamp_min(1e-12)).clamp_min(floor)
        pi = self.labeled_counts.cpu().float().clamp_min(1.0)
        return (s / s.sum()).log() - (pi / pi.sum()).log()

    # -- a step --------------------------------------------------------------------------
    def unlabeled_indices(self, step: int, gen: torch.Generator, global_batch: int) -> torch.Tensor | None:
        """The global batch of accepted faces for ``step`` (class-balanced or uniform over accepted)."""
        if not self.wants_unlabeled(step):
            return None
        acc = self.accepted.cpu()
        w = self.draw_weights()
        if self.cfg.round_consistency <= 0:
            return torch.multinomial(w, global_batch, replacement=True, generator=gen)
        # Interleaved (accepted, uniform) pairs, so every rank's slice holds both halves.
        n = global_batch // 2
        chosen = torch.multinomial(w, global_batch - n, replacement=True, generator=gen)
        anywhere = torch.randint(0, acc.numel(), (n,), generator=gen)
        out = torch.empty(global_batch, dtype=torch.long)
        out[0::2], out[1::2] = chosen, anywhere
        return out

    def step(self, student: nn.Module, teacher: nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, Logs]:
        if "x_us" not in batch:
            return super().step(student, teacher, batch, step)
        x_l, y_l, x_us, idx = batch["x_l"], batch["y_l"], batch["x_us"], batch["idx_u"]
        target = None   # with round_consistency, only the accepted half of the batch has targets (below)
        if self.cfg.pseudo_mixup > 0:
            x_us, target = mix_pairs(x_us, self.targets[idx].float(), mixup_weights(self.cfg.pseudo_mixup, step, idx))
        logits = student(torch.cat([x_l, x_us]))
        logits_l, logits_u = logits[:x_l.shape[0]], logits[x_l.shape[0]:].float()
        extra: Logs = {}
        loss_c = None
        if self.cfg.round_consistency > 0:
            # even positions: the round's accepted faces; odd: uniform draws (unlabeled_indices)
            with torch.no_grad():
                probs = teacher(batch["x_uw"][1::2]).float().softmax(1)
            conf, guess = probs.max(1)
            mask = (conf >= self.cfg.tau).float()
            loss_c = (F.cross_entropy(logits_u[1::2], guess, reduction="none") * mask).mean()
            extra = {"loss_c": loss_c.detach(), "consistency_mask_rate": mask.mean()}
            logits_u, idx = logits_u[0::2], idx[0::2]
            if batch.get("y_u_true") is not None:
                batch = {**batch, "y_u_true": batch["y_u_true"][0::2]}
        if target is None:
            target = self.targets[idx].float()
        loss_x = self.labeled_loss(logits_l, y_l)
        adjusted = logits_u + self.stream_log_ratio if self.cfg.stream_prior_correction else logits_u
        loss_u = -(target * adjusted.log_softmax(1)).sum(1).mean()
        lam = self.unlabeled_weight(step)
        loss = loss_x + lam * loss_u
        if loss_c is not None:
            loss = loss + self.cfg.round_consistency * loss_c
        pseudo = self.pseudo[idx]
        mix = torch.bincount(pseudo, minlength=self.num_classes)[:self.num_classes].float() / max(len(idx), 1)
        logs: Logs = {"loss": loss.detach(), "loss_x": loss_x.detach(), "loss_u": loss_u.detach(),
                      "mask_rate": self.accepted.float().mean(), "lambda_u": torch.tensor(lam),
                      "thresholds": self.policy.thresholds().detach().clone(), "pseudo_class_mix": mix, **extra}
        if batch.get("y_u_true") is not None:
            known = batch["y_u_true"] >= 0
            logs["pseudo_acc"] = ((pseudo == batch["y_u_true"]) & known).float().sum() / known.float().sum().clamp_min(1)
        return loss, logs
