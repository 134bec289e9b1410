"""The training loop: step, log, evaluate, checkpoint. Short and flat, read top to bottom.

It knows devices, precision, ranks, checkpoints and time; what a step computes belongs to
the algorithm (semifer.ssl), what exists before the first step to engine/setup.py.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from semifer import dist
from semifer.config import TrainConfig, to_dict
from semifer.data.augment import apply_cutout, reframe_view, strong_view, weak_view
from semifer.data.imageset import ImageSet, step_generator
from semifer.engine.checkpoint import atomic_save
from semifer.engine.guard import BufferSnapshot, NonFiniteGuard, NonFiniteTrainingError, all_finite
from semifer.engine.optim import lr_at
from semifer.engine.runlog import RunLogger, to_plain
from semifer.engine.setup import BEST, LAST, Run, TrainState, join_holdout
from semifer.eval.evaluate import evaluate_model
from semifer.labels import ABAW_LABELS
from semifer.ssl.context import StepContext

# data.labeled_augment -> the labeled batch's view
LABELED_VIEWS = {"weak": weak_view, "strong": strong_view, "reframe": reframe_view}


def run_steps(run: Run, state: TrainState, logger: RunLogger, end: int, bar=None) -> None:
    """Train ``run`` from ``state.step`` to ``end``, updating ``state`` (step, best, wall time) in place."""
    cfg, device, amp, model, ema, algo, opt = run.cfg, run.device, run.amp, run.model, run.ema, run.algo, run.opt
    rank, world = dist.rank(), dist.world_size()
    total = cfg.optim.steps
    guard = state.guard
    bn_snapshot = BufferSnapshot(model, ema.module)
    student: nn.Module = model
    if world > 1:
        student = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    teacher: nn.Module = student if cfg.ssl.teacher == "self" else ema
    ctx = StepContext(teacher=ema.module, device=device, amp=amp, total_steps=total,
                      eval_batch_size=cfg.run.eval_batch_size, log=logger.log)
    model.train()
    t0, images_seen, window_t = time.perf_counter(), 0, time.perf_counter()
    wall0 = state.wall_s
    step = state.step
    while step < end:
        algo.before_step(step, ctx)  # e.g. a new round's pseudo-labels, a re-fitted calibration
        if run.holdout is not None and not run.holdout_joined and algo.holdout_released(step, total):
            join_holdout(run)
            logger.log({"kind": "info", "step": step, "holdout_joined": len(run.holdout),
                        "labeled_now": len(run.lab_src)})
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg.optim, step) * g.get("lr_scale", 1.0)
        lb = run.lab_src.batch(step)
        # One generator for all ranks, each keeping its slice of the global batch's draws: a
        # world-W run augments every sample as one process with a W x batch would.
        gen, shard = step_generator(cfg.run.seed, step, 0, 0, device), (rank, world)
        # Pinned sources on CUDA: no copy below waits for the device (a pageable copy would).
        labeled_view = LABELED_VIEWS[cfg.data.labeled_augment]
        x_l = labeled_view(lb["x"].to(device, non_blocking=True), gen, shard=shard)
        if cfg.data.labeled_erase > 0:  # drawn only when on, so runs without it keep their stream
            x_l = apply_cutout(x_l, gen, cfg.data.labeled_erase, shard=shard)
        batch = {"x_l": x_l, "y_l": lb["y"].to(device, non_blocking=True)}
        if run.unl_src is not None and algo.wants_unlabeled(step):
            ub = _unlabeled_batch(algo, run.unl_src, run.unlabeled, step, cfg, rank, world)
            xu = ub["x"].to(device, non_blocking=True)
            views = algo.unlabeled_views
            if "weak" in views:
                batch["x_uw"] = weak_view(xu, gen, shard=shard)
            if "strong" in views:
                batch["x_us"] = strong_view(xu, gen, shard=shard)
            batch.update(idx_u=ub["idx"].to(device, non_blocking=True) if ub.get("idx") is not None else None,
                         y_u_true=ub["y_true"].to(device, non_blocking=True) if ub.get("y_true") is not None else None)
        bn_snapshot.take()
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss, logs = algo.step(student, teacher, batch, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip, foreach=True)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None],
                                                      foreach=True)
        # A non-finite step is skipped (weights, optimizer state and EMA untouched) and counted.
        if guard.step_ok(loss, grad_norm, step):
            opt.step()
            ema.update(model, step, fallback=batch["x_l"])
        else:
            bn_snapshot.restore()
            logs = {**logs, "nonfinite_skipped": torch.tensor(float(guard.total))}
        images_seen += sum(v.shape[0] for k, v in batch.items() if k.startswith("x_"))
        step += 1
        state.step = step
        if bar is not None:
            bar.update(1)
        if step % cfg.run.log_every == 0 or step == end:
            now = time.perf_counter()
            rec = {"kind": "train", "step": step, "lr": opt.param_groups[0]["lr"],
                   "img_per_s": images_seen * world / max(now - window_t, 1e-9), **to_plain(logs)}
            images_seen, window_t = 0, now
            logger.log(rec)
            if bar is not None:
                # A skipped non-finite step logs its loss as null.
                shown = {k: ("nan" if rec.get(k) is None else f"{rec[k]:.3f}") for k in ("loss", "mask_rate") if k in rec}
                bar.set_postfix(**shown)
        if step % cfg.run.eval_every == 0 or step == total:
            _evaluate(run, state, logger, step)
        if step % cfg.run.checkpoint_every == 0 or step == end:
            state.wall_s = wall0 + time.perf_counter() - t0
            if dist.is_main():
                _save_training_state(run.run_dir / LAST, step, model, ema, algo, opt, state.best, state.wall_s,
                                     cfg, guard)
    state.wall_s = wall0 + time.perf_counter() - t0


def _evaluate(run: Run, state: TrainState, logger: RunLogger, step: int) -> None:
    """Score the EMA teacher on the validation set; keep it as best.pt when macro-F1 improves."""
    cfg, ema = run.cfg, run.ema
    scores = evaluate_model(ema.module, run.val.images, run.val.labels, batch_size=cfg.run.eval_batch_size,
                            device=run.device, amp_dtype=run.amp)
    logger.log({"kind": "eval", "step": step, **scores})
    if scores["macro_f1"] > state.best["macro_f1"]:
        state.best = {**scores, "step": step}
        if dist.is_main():
            atomic_save({"model": ema.module.state_dict(), "step": step, "scores": scores,
                         "config": to_dict(cfg), "labels": list(ABAW_LABELS)}, run.run_dir / BEST)


def _unlabeled_batch(algo, unl_src, unlabeled: ImageSet | None, step: int, cfg: TrainConfig, rank: int,
                     world: int) -> dict:
    """This rank's unlabeled batch: indices the algorithm chose (e.g. accepted faces), else the source's."""
    per_rank = cfg.optim.batch_size * cfg.ssl.mu
    chosen = None
    if unlabeled is not None:
        gen = step_generator(cfg.run.seed, step, 0, 3)
        chosen = algo.unlabeled_indices(step, gen, per_rank * world)
    if chosen is None:
        return unl_src.batch(step)
    idx = chosen[rank * per_rank:(rank + 1) * per_rank]
    tl = unlabeled.true_labels
    return {"x": unlabeled.images[idx], "idx": idx, "y_true": tl[idx] if tl is not None else None}



def _save_training_state(path: Path, step: int, model, ema, algo, opt, best: dict, wall_s: float, cfg,
                         guard: NonFiniteGuard) -> None:
    if not (all_finite(model) and all_finite(ema.module)):
        raise NonFiniteTrainingError(f"weights became non-finite by step {step}; not overwriting {path}, "
                                     "which holds the last good state")
    atomic_save({"step": step, "model": model.state_dict(), "ema": ema.module.state_dict(),
                 "algorithm": algo.state_dict(), "optimizer": opt.state_dict(), "best": best,
                 "wall_s": wall_s, "config": to_dict(cfg), "labels": list(ABAW_LABELS),
                 "nonfinite": guard.state_dict()}, path)
