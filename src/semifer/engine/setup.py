"""Everything a training run needs before its first step: data, model, teacher, algorithm, optimizer.

:func:`build_run` assembles a :class:`Run` from the config; :func:`resume` (one function, as
in DINO) loads the run directory's last checkpoint into it. The loop (engine/loop.py) then
only steps; nothing here knows about steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from semifer import dist
from semifer.config import TrainConfig
from semifer.data.formats import load_source
from semifer.data.imageset import ImageSet, InMemorySource
from semifer.data.splits import save_split, stratified_subset
from semifer.engine.checkpoint import load_checkpoint
from semifer.engine.ema import ModelEMA
from semifer.engine.guard import NonFiniteGuard
from semifer.engine.optim import make_optimizer, set_fused
from semifer.labels import NUM_CLASSES
from semifer.models import build_model
from semifer.registry import ALGORITHMS
from semifer.ssl import Algorithm, build_algorithm

LAST = "checkpoints/last.pt"
BEST = "checkpoints/best.pt"


@dataclass
class Run:
    """The built pieces of one training run (no step state)."""

    cfg: TrainConfig
    run_dir: Path
    device: torch.device
    amp: torch.dtype | None
    labeled: ImageSet
    val: ImageSet
    holdout: ImageSet | None            # DTM's calibration slice, carved off the labeled set
    unlabeled: ImageSet | None          # in-memory unlabeled set (None: streamed or not used)
    unl_src: object | None              # batch source of the unlabeled faces
    num_unlabeled: int | None
    lab_src: InMemorySource
    model: nn.Module
    ema: ModelEMA
    algo: Algorithm
    opt: torch.optim.Optimizer
    fused: bool
    pretrained: object | None = None
    holdout_joined: bool = False        # the held-out slice was added to lab_src (join_holdout)

    @property
    def skipped(self) -> dict:
        return {s.name: s.skipped for s in (self.labeled, self.val, self.unlabeled) if s is not None and s.skipped}


@dataclass
class TrainState:
    """What changes step by step and is restored on resume."""

    step: int = 0
    wall_s: float = 0.0
    best: dict = field(default_factory=lambda: {"macro_f1": -1.0, "step": -1})
    guard: NonFiniteGuard | None = None


def build_run(cfg: TrainConfig, run_dir: Path, device: torch.device, amp: torch.dtype | None) -> Run:
    """Load the data sets and build model, EMA teacher, algorithm and optimizer for ``cfg``."""
    rank, world = dist.rank(), dist.world_size()
    pin = device.type == "cuda"  # pinned host batches: host->device copies run async (non_blocking)
    C = NUM_CLASSES
    from semifer.faces.prepare import check_frame

    for spec in [cfg.data.labeled, cfg.data.val, cfg.data.test, *cfg.data.unlabeled]:
        if spec:
            check_frame(spec, cfg.data.face_frame, "data.face_frame")
    source = _nonempty(_labeled(load_source(cfg.data.labeled, cfg.data)), cfg.data.labeled, "data.labeled")
    labeled, val, rest = _split_labeled(source, cfg, run_dir)
    labeled, holdout = _split_holdout(labeled, cfg, run_dir)
    if val is None:
        val = _nonempty(_labeled(load_source(cfg.data.val, cfg.data)), cfg.data.val, "data.val")
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
    unlabeled, unl_src, num_unlabeled = None, None, None
    if _algorithm_uses_unlabeled(cfg.ssl.algorithm):
        unlabeled, unl_src, num_unlabeled = _unlabeled_source(cfg, rest, rank, world, pin)
    if dist.is_main():
        describe_sources(cfg, labeled, val, holdout, unlabeled, num_unlabeled)
    algo = build_algorithm(cfg.ssl, C, labeled.class_counts(C), num_unlabeled=num_unlabeled,
                           imbalance=cfg.optim.imbalance, label_smoothing=cfg.optim.label_smoothing).to(device)
    algo.bind(unlabeled=unlabeled, holdout=holdout)
    fused = device.type == "cuda"  # fused optimizer kernels on CUDA; CPU keeps its (bit-exact) default
    opt = make_optimizer(cfg.optim, model, fused=fused)
    lab_src = InMemorySource(labeled, cfg.optim.batch_size, cfg.run.seed, rank, world, stream=1, pin_memory=pin)
    return Run(cfg, run_dir, device, amp, labeled, val, holdout, unlabeled, unl_src, num_unlabeled, lab_src,
               model, ema, algo, opt, fused, pretrained)


def join_holdout(run: Run) -> None:
    """Train on the held-out slice from now on: ``lab_src`` becomes labeled + holdout.

    The sampler is a function of (seed, step, size), so a run resumed after this point rebuilds
    the same batches by calling this again at its first step.
    """
    cfg, rank, world = run.cfg, dist.rank(), dist.world_size()
    both = ImageSet(torch.cat([run.labeled.images, run.holdout.images]), torch.cat([run.labeled.labels, run.holdout.labels]),
                    name=run.labeled.name, skipped=run.labeled.skipped)
    run.lab_src = InMemorySource(both, cfg.optim.batch_size, cfg.run.seed, rank, world, stream=1,
                                 pin_memory=run.lab_src.pin_memory)
    run.holdout_joined = True


def resume(run: Run) -> TrainState:
    """Load ``RUN/checkpoints/last.pt`` (if any) into ``run``'s modules; return the step state."""
    state = TrainState(guard=NonFiniteGuard(run.cfg.optim.max_nonfinite_steps))
    last_path = run.run_dir / LAST
    if dist.is_main():
        # A process killed inside atomic_save leaves its partial temp file; the real files are intact.
        for stale in sorted(last_path.parent.glob(".*.tmp")) if last_path.parent.exists() else []:
            print(f"semifer: removing {stale.name}, a checkpoint write interrupted by a kill")
            stale.unlink()
    if last_path.exists():
        ck = load_checkpoint(last_path, map_location=run.device)
        run.model.load_state_dict(ck["model"])
        run.ema.module.load_state_dict(ck["ema"])
        run.algo.load_state_dict(ck["algorithm"])
        run.opt.load_state_dict(ck["optimizer"])
        set_fused(run.opt, run.fused)
        state.step, state.wall_s, state.best = int(ck["step"]), float(ck["wall_s"]), dict(ck["best"])
        state.guard.load_state_dict(ck.get("nonfinite", {}))
    return state


def _unlabeled_source(cfg: TrainConfig, rest: ImageSet | None, rank: int, world: int, pin: bool):
    """(in-memory set or None, batch source, number of indexed samples or None)."""
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
        return None, unl_src, (len(unl_src) if unl_src.has_index else None)
    if cfg.data.unlabeled_weights:
        raise ValueError("data.unlabeled_weights applies to streamed sources; in-memory sets are "
                         "concatenated and sampled uniformly")
    sets = [_nonempty(load_source(s, cfg.data), s, "data.unlabeled") for s in cfg.data.unlabeled]
    if rest is not None and cfg.data.rest_as_unlabeled:
        sets.append(rest)
    if not sets:
        raise ValueError(f"{cfg.ssl.algorithm} needs unlabeled data: set data.unlabeled")
    unlabeled = _concat(sets, "unlabeled")
    unl_src = InMemorySource(unlabeled, cfg.optim.batch_size * cfg.ssl.mu, cfg.run.seed, rank, world, stream=2,
                             pin_memory=pin)
    return unlabeled, unl_src, len(unlabeled)


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


def _nonempty(data: ImageSet, spec: str, key: str) -> ImageSet:
    if len(data) == 0:
        raise ValueError(f"{key} = {spec!r}: no usable images" + (f" (skipped: {data.skipped})" if data.skipped else ""))
    return data


def _split_labeled(data: ImageSet, cfg: TrainConfig, run_dir: Path
                   ) -> tuple[ImageSet, ImageSet | None, ImageSet | None]:
    """(labeled, carved val or None, rest or None) from the labeled source; written to split.json.

    Without ``data.val`` a class-stratified ``data.val_fraction`` of the source is set aside
    first, so validation faces are never trained on (not even as unlabeled). Then
    ``data.labeled_fraction`` / ``labeled_per_class`` keep a subset; the rest keeps its labels
    only as hidden truth (diagnostics) and joins the unlabeled set by default.
    """
    d = cfg.data
    index = torch.arange(len(data))
    meta: dict = {"source": d.labeled, "num_samples": len(data), "seed": d.split_seed}
    val = None
    if not d.val:
        v, index = stratified_subset(data.labels, fraction=d.val_fraction, seed=d.split_seed + 2)
        if len(index) == 0:
            raise ValueError(f"data.labeled = {d.labeled!r}: data.val_fraction {d.val_fraction} leaves nothing to train on")
        val = ImageSet(data.images[v], data.labels[v], name=f"{data.name} (val split, {d.val_fraction:g})")
        meta.update(val_fraction=d.val_fraction, val=v.tolist())
    rest = None
    if d.labeled_fraction > 0 or d.labeled_per_class > 0:
        chosen, left = stratified_subset(data.labels[index], fraction=d.labeled_fraction,
                                         per_class=d.labeled_per_class, seed=d.split_seed)
        chosen, left = index[chosen], index[left]
        meta.update(fraction=d.labeled_fraction, per_class=d.labeled_per_class)
        rest = ImageSet(data.images[left], torch.full((len(left),), -1, dtype=torch.long), data.labels[left],
                        name=f"{data.name} (rest, unlabeled)")
        index = chosen
    if dist.is_main() and (val is not None or rest is not None):
        save_split(run_dir / "split.json", index, rest_index(len(data), index, meta.get("val", [])), meta)
    if val is None and rest is None:
        return data, None, None
    lab = ImageSet(data.images[index], data.labels[index], name=f"{data.name} (labeled split)", skipped=data.skipped)
    return lab, val, rest


def rest_index(n: int, labeled: torch.Tensor, val: list[int]) -> torch.Tensor:
    """Indices of ``n`` that are neither labeled nor val (sorted)."""
    mask = torch.ones(n, dtype=torch.bool)
    mask[labeled] = False
    mask[torch.tensor(val, dtype=torch.long)] = False
    return torch.nonzero(mask).flatten()


def describe_sources(cfg: TrainConfig, labeled: ImageSet, val: ImageSet, holdout: ImageSet | None,
                     unlabeled: ImageSet | None, num_unlabeled: int | None) -> None:
    """Say on the console what every data set of the run is and how big it is."""
    d = cfg.data
    demo = d.labeled.startswith("synthetic:")
    print(f"semifer: data{' (the embedded synthetic demo faces)' if demo else ''}:")
    print(f"  labeled    {d.labeled}: {len(labeled)} images trained on"
          + (f", {len(holdout)} held out for DTM's calibration" if holdout is not None else ""))
    print(f"  val        {d.val or f'{d.val_fraction:g} of {d.labeled} (split.json)'}: {len(val)} images "
          "(checkpoint selection)")
    if _algorithm_uses_unlabeled(cfg.ssl.algorithm):
        names = list(d.unlabeled) + (["the labeled source's rest"] if d.rest_as_unlabeled and
                                     (d.labeled_fraction > 0 or d.labeled_per_class > 0) else [])
        size = "streamed" if num_unlabeled is None else f"{num_unlabeled} images"
        print(f"  unlabeled  {', '.join(names) or '(none)'}: {size}")
    if d.test:
        print(f"  test       {d.test}: scored once at the end with the selected checkpoint")


def _split_holdout(labeled: ImageSet, cfg: TrainConfig, run_dir: Path) -> tuple[ImageSet, ImageSet | None]:
    """Carve DTM's held-out calibration slice (class-stratified, ssl.holdout_fraction) off the labeled set."""
    f = cfg.ssl.holdout_fraction
    if not getattr(ALGORITHMS.get(cfg.ssl.algorithm), "uses_holdout", False) or f <= 0:
        return labeled, None
    held, kept = stratified_subset(labeled.labels, fraction=f, seed=cfg.data.split_seed + 1)
    if len(kept) == 0:
        raise ValueError(f"{labeled.name}: ssl.holdout_fraction {f} leaves no labeled images to train on")
    if dist.is_main():
        save_split(run_dir / "holdout.json", held, kept,
                   {"what": "indices into the labeled set: 'labeled' = DTM's held-out calibration slice, "
                            "'rest' = trained on", "fraction": f, "seed": cfg.data.split_seed + 1})
    return (ImageSet(labeled.images[kept], labeled.labels[kept], name=labeled.name, skipped=labeled.skipped),
            ImageSet(labeled.images[held], labeled.labels[held], name=f"{labeled.name} (held out for DTM)"))



def is_streamed_spec(spec: str) -> bool:
    """Unlabeled specs read by :mod:`semifer.data.unlabeled` instead of decoded into memory."""
    from semifer.registry import FORMATS, UNLABELED_SOURCES

    kind = spec.split(":", 1)[0]
    return kind == "stream" or (kind in UNLABELED_SOURCES and kind not in FORMATS)


def _algorithm_uses_unlabeled(name: str) -> bool:
    return bool(ALGORITHMS.get(name).uses_unlabeled)
