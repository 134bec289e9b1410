"""Stage 0: self-supervised pretraining of the backbone on the unlabeled faces (SimCLR).

SimCLR (Chen et al. 2020): two strong views of every face in a batch, a 2-layer MLP
projection head on the backbone features, and the NT-Xent loss, which asks each view to
pick its partner out of the 2N - 1 other views of the batch. Labels are never used, so
the images are the in-memory unlabeled sources plus every image of the labeled source.

The backbone is the one ``semifer train`` builds from the same config, so its weights load
into the later run unchanged with ``model.pretrained: OUT/pretrained.pt``.

Resume is exact as in training: batches come from a step-addressed sampler and each step's
augmentation from its own generator, so ``OUT/pretrain_last.pt`` (model, projection head,
optimizer, step) is all the state there is. Single process (no DDP).

A cheap check at the end: k-nearest-neighbour (k = 20, cosine) accuracy of the backbone
features on the validation set, with the labeled source as the bank, for the initial and the
pretrained backbone. If pretraining learned nothing useful the two are close.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from semifer.config import TrainConfig, to_dict
from semifer.data.augment import eval_view, strong_view
from semifer.data.formats import load_source
from semifer.data.imageset import ImageSet, InMemorySource, _mix, step_generator
from semifer.engine.checkpoint import atomic_save, load_checkpoint
from semifer.engine.setup import _concat, is_streamed_spec
from semifer.engine.trainer import amp_dtype, resolve_device
from semifer.eval.metrics import classification_scores
from semifer.labels import NUM_CLASSES
from semifer.models import build_model

LAST = "pretrain_last.pt"
OUTPUT = "pretrained.pt"
LOG = "pretrain.jsonl"
CHECKPOINT_EVERY = 100
LOG_EVERY = 10
KNN_K = 20
STREAM = 5  # sampler / augmentation stream id (training uses 0-3)


def pretrain(cfg: TrainConfig, out: Path, steps: int, batch_size: int = 128, temperature: float = 0.2,
             lr: float = 0.06, proj_dim: int = 64, stop_after: int | None = None) -> dict:
    """SimCLR-pretrain ``cfg``'s backbone for ``steps`` steps into ``out`` (re-running resumes).

    Writes ``out/pretrain_last.pt`` (every 100 steps and at the end), ``out/pretrain.jsonl``
    and, once all ``steps`` are done, ``out/pretrained.pt`` ({"model", "config", "pretrain"}).
    ``stop_after`` ends this invocation after that many steps, with a checkpoint.
    Returns a summary dict (steps, loss, wall_s, images, path, knn_init, knn_pretrained, ...).
    """
    if steps <= 0 or batch_size <= 1 or temperature <= 0:
        raise ValueError(f"pretrain needs steps > 0, batch_size > 1, temperature > 0 "
                         f"(got {steps}, {batch_size}, {temperature})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.run.device)
    amp = amp_dtype(cfg.optim.amp, device)
    seed = cfg.run.seed
    images = pretrain_images(cfg)
    src = InMemorySource(images, batch_size, seed, stream=STREAM, pin_memory=device.type == "cuda")

    model, init_report = _initial_model(cfg)
    model = model.to(device)
    if cfg.optim.channels_last is True or (cfg.optim.channels_last == "auto" and amp is not None):
        model = model.to(memory_format=torch.channels_last)  # strides only: the state dict is unchanged
    dim = model.head.in_features
    proj = ProjectionHead(dim, proj_dim).to(device)
    opt = _optimizer([model.backbone, proj], lr)
    settings = {"steps": steps, "batch_size": batch_size, "temperature": temperature, "lr": lr,
                "proj_dim": proj_dim, "seed": seed, "sources": pretrain_sources(cfg), "images": len(images),
                "backbone": cfg.model.backbone, "backbone_args": dict(cfg.model.backbone_args),
                "image_size": cfg.data.image_size, "channels": cfg.data.channels,
                "init": cfg.model.pretrained or "random"}

    for stale in sorted(out.glob(f".{LAST}.*.tmp")):  # a kill inside atomic_save; the real file is intact
        stale.unlink()
    step, wall0, last_loss = 0, 0.0, float("nan")
    if (out / LAST).exists():
        ck = load_checkpoint(out / LAST, map_location=device)
        saved = ck.get("settings", {})
        diff = {k: (saved.get(k), v) for k, v in settings.items() if _json(saved.get(k)) != _json(v)}
        if diff:
            raise ValueError(f"{out / LAST} was written with other settings ({_fmt_diff(diff)}); "
                             "use a new --out, or the same settings to resume")
        model.load_state_dict(ck["model"])
        proj.load_state_dict(ck["proj"])
        opt.load_state_dict(ck["optimizer"])
        step, wall0, last_loss = int(ck["step"]), float(ck["wall_s"]), float(ck.get("loss", float("nan")))

    log = _Log(out / LOG, resume_step=step if step > 0 else None)
    if step == 0:
        log.write({"kind": "info", "step": 0, **settings, "device": str(device), "amp": str(amp),
                   "skipped": images.skipped,
                   **({"init_report": init_report.as_dict()} if init_report is not None else {})})
    end = steps if stop_after is None else min(steps, step + stop_after)
    bar = None
    if cfg.run.progress and step < end:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, initial=step, desc="pretrain", unit="step", dynamic_ncols=True)

    model.train()
    proj.train()
    t0 = time.perf_counter()
    window_loss, window_n, window_t = 0.0, 0, time.perf_counter()

    def save(at: int) -> None:
        atomic_save({"step": at, "model": model.state_dict(), "proj": proj.state_dict(),
                     "optimizer": opt.state_dict(), "wall_s": wall0 + time.perf_counter() - t0,
                     "loss": last_loss, "settings": settings, "config": to_dict(cfg)}, out / LAST)

    while step < end:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(lr, step, steps)
        # Dropout / drop-path (if the backbone has any) draw from the global RNG: seed it per step.
        torch.manual_seed(_mix(seed, step, STREAM, 0x51))
        x = src.batch(step)["x"].to(device, non_blocking=True)
        gen = step_generator(seed, step, 0, STREAM, device)
        views = torch.cat([strong_view(x, gen), strong_view(x, gen)])
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            z = proj(features(model, views))
        loss = nt_xent(z.float(), temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        last = loss.detach()  # no host sync per step: read at log and checkpoint steps
        window_loss, window_n = window_loss + last, window_n + 1
        if bar is not None:
            bar.update(1)
        if step % LOG_EVERY == 0 or step == end:  # every checkpoint step is a log step: checked before saving
            if not torch.isfinite(window_loss):
                raise FloatingPointError(f"pretrain: non-finite loss between steps {step - window_n + 1} and {step}; "
                                         f"{out / LAST} keeps the last good state (try a lower lr or optim.amp=off)")
            now = time.perf_counter()
            last_loss = float(last)
            rec = {"kind": "train", "step": step, "loss": float(window_loss) / window_n, "lr": opt.param_groups[0]["lr"],
                   "s_per_step": (now - window_t) / window_n}
            log.write(rec)
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss']:.3f}")
            window_loss, window_n, window_t = 0.0, 0, now
        if step % CHECKPOINT_EVERY == 0 or step == end:
            last_loss = float(last)
            save(step)
    if bar is not None:
        bar.close()
    wall_s = wall0 + time.perf_counter() - t0
    summary = {"steps": step, "completed": step >= steps, "loss": last_loss, "wall_s": wall_s,
               "images": len(images), "checkpoint": str(out / LAST), "path": None}
    if step < steps:
        log.write({"kind": "info", "step": step, "event": "stopped", "wall_s": wall_s})
        log.close()
        return summary

    knn = {"init": knn_accuracy(_initial_model(cfg)[0].to(device), cfg, device, amp),
           "pretrained": knn_accuracy(model, cfg, device, amp)}
    meta = {**settings, "wall_s": wall_s, "final_loss": last_loss, "knn": knn}
    atomic_save({"model": model.state_dict(), "config": to_dict(cfg), "pretrain": meta}, out / OUTPUT)
    log.write({"kind": "knn", "step": step, "k": knn["init"]["k"],
               **{f"{w}_{m}": knn[w][m] for w in knn for m in ("accuracy", "macro_f1")}})
    log.write({"kind": "info", "step": step, "event": "end", "wall_s": wall_s})
    log.close()
    summary.update(path=str(out / OUTPUT), knn_init=knn["init"], knn_pretrained=knn["pretrained"])
    return summary


# ----------------------------------------------------------------------------- pieces


class ProjectionHead(nn.Module):
    """SimCLR's 2-layer MLP g(h): Linear - BatchNorm - ReLU - Linear (discarded after pretraining)."""

    def __init__(self, dim: int, proj_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                                 nn.Linear(dim, proj_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Backbone features of float images in [0, 1], normalised as the classifier does."""
    return model.backbone((x - model.mean) / model.std)


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent of 2N projections ``z`` = [view 1 of N faces; view 2 of the same N faces].

    l_i = -log( exp(s_{i,p(i)} / T) / sum_{k != i} exp(s_{i,k} / T) ), s = cosine similarity,
    p(i) = the other view of face i; the mean over all 2N anchors.
    """
    n2 = z.shape[0]
    if n2 % 2:
        raise ValueError(f"nt_xent needs two views per face (an even count), got {n2}")
    z = F.normalize(z, dim=1)
    sim = (z @ z.t()) / temperature
    sim = sim.masked_fill(torch.eye(n2, dtype=torch.bool, device=z.device), float("-inf"))
    n = n2 // 2
    target = torch.cat([torch.arange(n, n2), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def cosine_lr(base: float, step: int, steps: int) -> float:
    """Cosine decay from ``base`` to 0 over ``steps`` (SimCLR's schedule, without the warm-up)."""
    return base * 0.5 * (1.0 + math.cos(math.pi * step / max(steps, 1)))


def _optimizer(modules: list[nn.Module], lr: float) -> torch.optim.SGD:
    """SGD momentum 0.9 Nesterov, weight decay 5e-4 on weights (not on biases and norm parameters)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": 5e-4},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)


def pretrain_sources(cfg: TrainConfig) -> list[str]:
    """Specs of the pretraining images: ``data.unlabeled`` then ``data.labeled`` (a spec listed twice counts once)."""
    return list(dict.fromkeys([*cfg.data.unlabeled, cfg.data.labeled]))


def pretrain_images(cfg: TrainConfig) -> ImageSet:
    """The in-memory unlabeled sources plus every image of the labeled source (labels unused)."""
    streamed = [s for s in cfg.data.unlabeled if is_streamed_spec(s)]
    if streamed:
        raise ValueError(f"pretrain reads in-memory sources only; streamed unlabeled source(s) {streamed} "
                         "are not supported (convert them to an in-memory format, or leave them out with "
                         "--set data.unlabeled=[...])")
    specs = pretrain_sources(cfg)
    sets = [load_source(s, cfg.data) for s in specs]
    data = _concat(sets, "pretrain")
    if len(data) < 2:
        raise ValueError(f"pretrain needs at least 2 images, {specs} hold {len(data)}")
    return data


def _initial_model(cfg: TrainConfig):
    """The model before pretraining: seeded init (+ ``model.pretrained`` if set); freezing is not applied."""
    mcfg = dataclasses.replace(cfg.model, freeze_stages=0, freeze_bn=False)
    torch.manual_seed(cfg.run.seed)
    model = build_model(mcfg, NUM_CLASSES, in_chans=cfg.data.channels)
    report = None
    if cfg.model.pretrained:
        from semifer.models.pretrained import load_pretrained
        report = load_pretrained(model.backbone, cfg.model.pretrained, cfg.model.pretrained_strict,
                                 cfg.model.backbone)
    return model, report


@torch.no_grad()
def _embed(model: nn.Module, images: torch.Tensor, device: torch.device, amp: torch.dtype | None,
           batch_size: int) -> torch.Tensor:
    outs = []
    for start in range(0, images.shape[0], batch_size):
        x = eval_view(images[start:start + batch_size].to(device))
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            outs.append(features(model, x).float())
    return F.normalize(torch.cat(outs), dim=1)


def knn_accuracy(model: nn.Module, cfg: TrainConfig, device: torch.device, amp: torch.dtype | None,
                 k: int = KNN_K) -> dict:
    """k-NN (cosine, similarity-weighted vote) scores of backbone features on ``cfg.data.val``;
    the bank is the labeled source's labeled images. One pass, eval mode, no gradients."""
    bank = load_source(cfg.data.labeled, cfg.data)
    val = load_source(cfg.data.val, cfg.data)
    keep = bank.labels >= 0
    bank_x, bank_y = bank.images[keep], bank.labels[keep]
    k = min(k, len(bank_y))
    if k == 0:
        raise ValueError(f"{cfg.data.labeled}: no labeled images for the k-NN bank")
    was = model.training
    model.eval()
    try:
        fb = _embed(model, bank_x, device, amp, cfg.run.eval_batch_size)
        fv = _embed(model, val.images, device, amp, cfg.run.eval_batch_size)
    finally:
        model.train(was)
    preds = []
    yb = bank_y.to(fb.device)
    for start in range(0, fv.shape[0], 1024):
        sim, idx = (fv[start:start + 1024] @ fb.t()).topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], NUM_CLASSES, device=fb.device)
        votes.scatter_add_(1, yb[idx], sim)
        preds.append(votes.argmax(1).cpu())
    pred = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
    scores = classification_scores(val.labels, pred)
    return {"k": k, "accuracy": float(scores["accuracy"]), "macro_f1": float(scores["macro_f1"]),
            "bank": len(bank_y), "val": len(val)}


def _json(v) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def _fmt_diff(diff: dict) -> str:
    return ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())


class _Log:
    """Append-only JSON lines with the run log's resume markers (readable by engine.runlog.read_metrics)."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        size = path.stat().st_size if path.exists() else 0
        needs_newline = False
        if size:
            with path.open("rb") as fh:
                fh.seek(-1, 2)
                needs_newline = fh.read(1) != b"\n"  # a killed run's partial last line
        self._file = path.open("a", encoding="utf-8")
        if needs_newline:
            self._file.write("\n")
        marker = resume_step if resume_step is not None else (-1 if size else None)
        if marker is not None:
            self.write({"kind": "resume", "step": marker})

    def write(self, rec: dict) -> None:
        from semifer.engine.runlog import to_plain
        self._file.write(json.dumps(to_plain({**rec, "time": time.time()})) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
