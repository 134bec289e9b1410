"""The training loop: one function, read top to bottom.

It is the only place that knows about devices, precision, ranks, checkpoints and
time. What a step computes belongs to the algorithm (``semifer.ssl``).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from semifer import dist
from semifer.config import OptimConfig, TrainConfig, to_dict
from semifer.data.augment import strong_view, weak_view
from semifer.data.formats import load_source
from semifer.data.imageset import ImageSet, InMemorySource, step_generator
from semifer.data.splits import save_split, stratified_subset
from semifer.engine.checkpoint import atomic_save, load_checkpoint
from semifer.engine.ema import ModelEMA
from semifer.engine.guard import BufferSnapshot, NonFiniteGuard, NonFiniteTrainingError, all_finite
from semifer.engine.rundir import prepare_run_dir
from semifer.engine.runlog import RunLogger, to_plain
from semifer.eval.evaluate import evaluate_model
from semifer.labels import ABAW_LABELS, NUM_CLASSES
from semifer.models import build_model
from semifer.ssl import build_algorithm

LAST = "checkpoints/last.pt"
BEST = "checkpoints/best.pt"
RESULTS = "results.json"


@dataclass
class RunResult:
    """What :func:`train` returns."""

    run_dir: Path
    algorithm: str
    steps: int                  # steps completed so far
    completed: bool             # reached cfg.optim.steps
    best_step: int
    best: dict                  # val scores of the best checkpoint (macro_f1, accuracy, per_class_f1, confusion)
    wall_s: float               # training wall time summed over all resumptions
    plots: list[Path] = field(default_factory=list)

    @property
    def macro_f1(self) -> float:
        return float(self.best.get("macro_f1", float("nan")))

    @property
    def accuracy(self) -> float:
        return float(self.best.get("accuracy", float("nan")))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            import os
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True where oneDNN runs bf16 natively (AVX512-BF16 / AMX): autocast is then ~3x faster on CPU."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where it pays: CUDA, and CPUs with native bf16 ('auto'); always with 'bf16'."""
    if setting == "off":
        return None
    if setting == "bf16" or device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16()):
        return torch.bfloat16
    return None


def make_optimizer(cfg: OptimConfig, model: nn.Module, fused: bool = False) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW; no weight decay on biases and normalisation parameters.

    ``fused``: one fused kernel per parameter group (the trainer sets it on CUDA only, so CPU
    numerics are unchanged); it changes no optimizer state, see :func:`set_fused`.

    With ``layer_decay`` or ``head_lr`` set, one group per backbone stage and the head, each
    with an ``lr_scale`` (semifer.models.finetune); otherwise the two groups of old, so old
    checkpoints' optimizer states still load.
    """
    if cfg.layer_decay != 1.0 or cfg.head_lr > 0:
        from semifer.models.finetune import layerwise_param_groups
        groups = layerwise_param_groups(model, cfg.weight_decay, cfg.lr, cfg.layer_decay, cfg.head_lr)
    else:
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if fused else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **kw)
    return torch.optim.AdamW(groups, lr=cfg.lr, **kw)


def set_fused(opt: torch.optim.Optimizer, fused: bool) -> None:
    """Pick the fused or the default implementation after ``load_state_dict``.

    A loaded state dict brings the saved run's ``fused``/``foreach`` flags along; the state
    itself (momentum buffers, Adam moments) is the same for both, so a checkpoint written on
    CUDA (fused) resumes on a CPU (default implementation) and the other way round.
    """
    for g in opt.param_groups:
        g["fused"] = True if fused else None
        if fused:
            g["foreach"] = None


def lr_at(cfg: OptimConfig, step: int) -> float:
    """Learning rate at ``step``: linear warm-up, then constant or FixMatch's cosine (7/16 of a period)."""
    if step < cfg.lr_warmup_steps:
        return cfg.lr * (step + 1) / cfg.lr_warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    return cfg.lr * math.cos(7 * math.pi * step / (16 * max(cfg.steps, 1)))


def _concat(sets: list[ImageSet], name: str) -> ImageSet:
    if len(sets) == 1:
        return sets[0]
    tl = None
    if any(s.true_labels is not None for s in sets):
        # Hidden truth where a source has it (e.g. the labeled set's held-out rest), -1 elsewhere.
        tl = torch.cat([s.true_labels if s.true_labels is not None else torch.full((len(s),), -1, dtype=torch.long)
                        for s in sets])
    skipped: dict[str, int] = {}
    for s in sets:
        for reason, n in s.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    return ImageSet(torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]), tl, name=name,
                    skipped=skipped)


def _labeled(data: ImageSet) -> ImageSet:
    if (data.labels < 0).any():
        raise ValueError(f"{data.name}: a labeled/val set holds unlabeled samples (label -1)")
    return data


def _split_labeled(data: ImageSet, cfg: TrainConfig, run_dir: Path) -> tuple[ImageSet, ImageSet | None]:
    """Apply data.labeled_fraction / labeled_per_class; the rest keeps its labels only as hidden truth."""
    d = cfg.data
    if d.labeled_fraction <= 0 and d.labeled_per_class <= 0:
        return data, None
    chosen, rest = stratified_subset(data.labels, fraction=d.labeled_fraction, per_class=d.labeled_per_class,
                                     seed=d.split_seed)
    if dist.is_main():
        save_split(run_dir / "split.json", chosen, rest,
                   {"source": d.labeled, "fraction": d.labeled_fraction, "per_class": d.labeled_per_class,
                    "seed": d.split_seed, "num_samples": len(data)})
    lab = ImageSet(data.images[chosen], data.labels[chosen], name=f"{data.name} (labeled split)", skipped=data.skipped)
    unl = ImageSet(data.images[rest], torch.full((len(rest),), -1, dtype=torch.long), data.labels[rest],
                   name=f"{data.name} (rest, unlabeled)")
    return lab, unl


def _save_training_state(path: Path, step: int, model, ema, algo, opt, best: dict, wall_s: float, cfg,
                         guard: NonFiniteGuard) -> None:
    if not (all_finite(model) and all_finite(ema.module)):
        raise NonFiniteTrainingError(f"weights became non-finite by step {step}; not overwriting {path}, "
                                     "which holds the last good state")
    atomic_save({"step": step, "model": model.state_dict(), "ema": ema.module.state_dict(),
                 "algorithm": algo.state_dict(), "optimizer": opt.state_dict(), "best": best,
                 "wall_s": wall_s, "config": to_dict(cfg), "labels": list(ABAW_LABELS),
                 "nonfinite": guard.state_dict()}, path)


def train(cfg: TrainConfig, *, stop_after: int | None = None) -> RunResult:
    """Train (or resume) the run described by ``cfg``; returns the best checkpoint's scores.

    Re-running with the same ``cfg.run.out`` resumes from the last checkpoint and
    ends with exactly the weights an uninterrupted run would have. ``stop_after``
    ends this invocation after that many steps (with a checkpoint), for time-sliced jobs.
    """
    dist.init_from_env()
    rank, world = dist.rank(), dist.world_size()
    device = resolve_device(cfg.run.device)
    # Rank 0 writes config.yaml first; the others compare against the finished file, not a half-written one.
    run_dir = prepare_run_dir(cfg, write=True) if dist.is_main() else None
    dist.barrier()
    run_dir = run_dir or prepare_run_dir(cfg, write=False)
    torch.manual_seed(cfg.run.seed)
    amp = amp_dtype(cfg.optim.amp, device)
    pin = device.type == "cuda"  # pinned host batches: host->device copies run async (non_blocking)
    C = NUM_CLASSES

    labeled, rest = _split_labeled(_labeled(load_source(cfg.data.labeled, cfg.data)), cfg, run_dir)
    val = _labeled(load_source(cfg.data.val, cfg.data))
    model = build_model(cfg.model, C, in_chans=cfg.data.channels).to(device)
    if cfg.optim.channels_last is True or (cfg.optim.channels_last == "auto" and amp is not None):
        model = model.to(memory_format=torch.channels_last)  # the EMA teacher copies it below
    pretrained = None
    if cfg.model.pretrained and not (run_dir / LAST).exists():  # a resumed run takes all weights from its checkpoint
        from semifer.models.pretrained import load_pretrained
        pretrained = load_pretrained(model.backbone, cfg.model.pretrained, cfg.model.pretrained_strict,
                                     cfg.model.backbone)
        if dist.is_main():
            print(f"semifer: pretrained: {pretrained.summary()}")
    ema = ModelEMA(model, cfg.ssl.ema_decay).to(device)
    if cfg.optim.compile:
        # In place: state_dict keys, checkpoints and the EMA's weight averaging are unchanged.
        model.compile()
        ema.module.compile()
    algo_cls_uses_unlabeled = _algorithm_uses_unlabeled(cfg.ssl.algorithm)
    unlabeled, unl_src, num_unlabeled = None, None, None
    if algo_cls_uses_unlabeled:
        streamed = [s for s in cfg.data.unlabeled if is_streamed_spec(s)]
        if streamed:
            # Face-recognition-scale sources: decoded in loader workers, never held in memory.
            if len(streamed) != len(cfg.data.unlabeled) or (rest is not None and cfg.data.rest_as_unlabeled):
                raise ValueError("streamed unlabeled sources (stream:/wds:/recordio:/list:) cannot be mixed with "
                                 "in-memory ones yet; use only streamed sources and data.rest_as_unlabeled: false")
            from semifer.data.unlabeled import MixedSource, StreamingBatchSource, open_unlabeled
            srcs = [open_unlabeled(s) for s in streamed]
            weights = cfg.data.unlabeled_weights or [1.0] * len(srcs)
            if len(weights) != len(srcs) or min(weights) <= 0:
                raise ValueError(f"data.unlabeled_weights needs one positive weight per unlabeled source, got {weights}")
            src = srcs[0] if len(srcs) == 1 else MixedSource(list(zip(srcs, weights)))
            unl_src = StreamingBatchSource(src, cfg.optim.batch_size * cfg.ssl.mu, cfg.data.image_size,
                                           cfg.data.channels, cfg.run.seed, rank, world,
                                           num_workers=cfg.data.num_workers, stream=2, pin_memory=pin)
            num_unlabeled = len(unl_src) if unl_src.has_index else None
        else:
            if cfg.data.unlabeled_weights:
                raise ValueError("data.unlabeled_weights applies to streamed sources; in-memory sets are "
                                 "concatenated and sampled uniformly")
            sets = [load_source(s, cfg.data) for s in cfg.data.unlabeled]
            if rest is not None and cfg.data.rest_as_unlabeled:
                sets.append(rest)
            if not sets:
                raise ValueError(f"{cfg.ssl.algorithm} needs unlabeled data: set data.unlabeled")
            unlabeled = _concat(sets, "unlabeled")
            unl_src = InMemorySource(unlabeled, cfg.optim.batch_size * cfg.ssl.mu, cfg.run.seed, rank, world, stream=2,
                                     pin_memory=pin)
            num_unlabeled = len(unlabeled)
    algo = build_algorithm(cfg.ssl, C, labeled.class_counts(C), num_unlabeled=num_unlabeled,
                           imbalance=cfg.optim.imbalance).to(device)
    fused = device.type == "cuda"  # fused optimizer kernels on CUDA; CPU keeps its (bit-exact) default
    opt = make_optimizer(cfg.optim, model, fused=fused)
    lab_src = InMemorySource(labeled, cfg.optim.batch_size, cfg.run.seed, rank, world, stream=1, pin_memory=pin)

    step, wall_s, best = 0, 0.0, {"macro_f1": -1.0, "step": -1}
    guard = NonFiniteGuard(cfg.optim.max_nonfinite_steps)
    bn_snapshot = BufferSnapshot(model, ema.module)
    last_path, best_path = run_dir / LAST, run_dir / BEST
    if dist.is_main():
        # A process killed inside atomic_save leaves its partial temp file; the real files are intact.
        for stale in sorted(last_path.parent.glob(".*.tmp")) if last_path.parent.exists() else []:
            print(f"semifer: removing {stale.name}, a checkpoint write interrupted by a kill")
            stale.unlink()
    if last_path.exists():
        ck = load_checkpoint(last_path, map_location=device)
        model.load_state_dict(ck["model"])
        ema.module.load_state_dict(ck["ema"])
        algo.load_state_dict(ck["algorithm"])
        opt.load_state_dict(ck["optimizer"])
        set_fused(opt, fused)
        step, wall_s, best = int(ck["step"]), float(ck["wall_s"]), dict(ck["best"])
        guard.load_state_dict(ck.get("nonfinite", {}))
    logger = RunLogger(run_dir, enabled=dist.is_main(), resume_step=step if step > 0 else None)
    student: nn.Module = model
    if world > 1:
        student = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    teacher: nn.Module = student if cfg.ssl.teacher == "self" else ema
    skipped = {s.name: s.skipped for s in (labeled, val, unlabeled) if s is not None and s.skipped}
    if step == 0:
        logger.log({"kind": "info", "step": 0, "labeled": len(labeled), "val": len(val),
                    "unlabeled": num_unlabeled if num_unlabeled is not None else "streamed", "device": str(device),
                    "world_size": world, "amp": str(amp), "skipped": skipped,
                    **({"pretrained": pretrained.as_dict()} if pretrained is not None else {})})

    total = cfg.optim.steps
    end = total if stop_after is None else min(total, step + stop_after)
    bar = None
    if cfg.run.progress and dist.is_main() and step < end:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=step, desc=f"{cfg.ssl.algorithm}", unit="step", dynamic_ncols=True)
    model.train()
    t0, images_seen, window_t = time.perf_counter(), 0, time.perf_counter()
    while step < end:
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg.optim, step) * g.get("lr_scale", 1.0)
        lb = lab_src.batch(step)
        # One generator for all ranks, each keeping its slice of the global batch's draws: a
        # world-W run augments every sample as one process with a W x batch would.
        gen, shard = step_generator(cfg.run.seed, step, 0, 0, device), (rank, world)
        # Pinned sources on CUDA: no copy below waits for the device (a pageable copy would).
        batch = {"x_l": weak_view(lb["x"].to(device, non_blocking=True), gen, shard=shard),
                 "y_l": lb["y"].to(device, non_blocking=True)}
        if unl_src is not None and algo.wants_unlabeled(step):
            ub = unl_src.batch(step)
            xu = ub["x"].to(device, non_blocking=True)
            batch.update(x_uw=weak_view(xu, gen, shard=shard), x_us=strong_view(xu, gen, shard=shard),
                         idx_u=ub["idx"].to(device, non_blocking=True) if ub.get("idx") is not None else None,
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
            scores = evaluate_model(ema.module, val.images, val.labels, batch_size=cfg.run.eval_batch_size,
                                    device=device, amp_dtype=amp)
            logger.log({"kind": "eval", "step": step, **scores})
            if scores["macro_f1"] > best["macro_f1"]:
                best = {**scores, "step": step}
                if dist.is_main():
                    atomic_save({"model": ema.module.state_dict(), "step": step, "scores": scores,
                                 "config": to_dict(cfg), "labels": list(ABAW_LABELS)}, best_path)
        if step % cfg.run.checkpoint_every == 0 or step == end:
            elapsed = wall_s + time.perf_counter() - t0
            if dist.is_main():
                _save_training_state(last_path, step, model, ema, algo, opt, best, elapsed, cfg, guard)
    if bar is not None:
        bar.close()
    if unl_src is not None and hasattr(unl_src, "close"):  # a streamed source: its workers found bad files
        if unl_src.skipped:
            skipped["unlabeled stream"] = dict(unl_src.skipped)
            logger.log({"kind": "info", "step": step, "unlabeled_skipped": dict(unl_src.skipped)})
        unl_src.close()
    wall_s += time.perf_counter() - t0
    completed = step >= total
    plots: list[Path] = []
    if dist.is_main():
        if completed:
            _write_results(run_dir, cfg, best, step, wall_s, skipped)
        for name, counts in skipped.items():
            print(f"semifer: {name}: skipped {sum(counts.values())} unusable inputs {counts}")
        logger.log({"kind": "info", "step": step, "event": "end", "completed": completed, "wall_s": wall_s})
        logger.close()
        from semifer.engine.plots import write_plots
        plots = write_plots(run_dir)
    else:
        logger.close()
    return RunResult(run_dir, cfg.ssl.algorithm, step, completed, int(best.get("step", -1)),
                     {k: v for k, v in best.items() if k != "step"}, wall_s, plots)


def is_streamed_spec(spec: str) -> bool:
    """Unlabeled specs read by :mod:`semifer.data.unlabeled` instead of decoded into memory."""
    from semifer.registry import FORMATS, UNLABELED_SOURCES

    kind = spec.split(":", 1)[0]
    return kind == "stream" or (kind in UNLABELED_SOURCES and kind not in FORMATS)


def _algorithm_uses_unlabeled(name: str) -> bool:
    from semifer.registry import ALGORITHMS
    return bool(ALGORITHMS.get(name).uses_unlabeled)


def _write_results(run_dir: Path, cfg: TrainConfig, best: dict, steps: int, wall_s: float,
                   skipped: dict | None = None) -> None:
    out = {"algorithm": cfg.ssl.algorithm, "steps": steps, "wall_s": wall_s, "best_step": best.get("step"),
           "macro_f1": best.get("macro_f1"), "accuracy": best.get("accuracy"),
           "per_class_f1": best.get("per_class_f1"), "confusion": best.get("confusion"),
           "skipped": skipped or {}}
    tmp = run_dir / (RESULTS + ".tmp")
    tmp.write_text(json.dumps(to_plain(out), indent=2))
    tmp.replace(run_dir / RESULTS)
