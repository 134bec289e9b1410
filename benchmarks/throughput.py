"""Semi-supervised training throughput on one machine: model-bound vs semifer's pipeline vs a CPU pipeline.

    python benchmarks/throughput.py --out DIR [--device auto|cpu|cuda] [--seconds S]
        [--backbones resnet18,ir50] [--size 112] [--batch B] [--mu MU] [--workers W] [--compile]

Per backbone, one DTM step processes ``batch * (1 + 2 mu)`` images (labeled weak, unlabeled
weak for the EMA teacher, unlabeled strong for the student); every rate counts them all:

(a) ``model_bound_img_s``: the trainer's step (algorithm step, backward, gradient norm and
    non-finite guard, fused/foreach optimizer, EMA) on random float views already on the device.
(b) ``device_pipeline_img_s``: the real :func:`semifer.engine.train` on ``npz:`` sources
    (uint8 in memory, copied as uint8, weak/strong views made on the device by
    ``semifer.data.augment``), read from its ``metrics.jsonl`` (warm-up records skipped).
(c) ``cpu_pipeline_img_s``: step (a) fed by a USB-style DataLoader whose workers decode JPEG
    bytes with PIL and apply torchvision's PIL flip/crop (weak) and RandAugment + erasing (strong).
(d) ``threshold_update_ms``: DTM policy ``update`` + ``mask`` with an indexed status over
    5.8M samples (MS1M scale), against ``step_ms``, the step time of (a).

Writes ``DIR/throughput.json`` (after every backbone, so a cut-off run keeps what it finished)
and prints a Markdown table. See docs/performance.md.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from semifer.config import TrainConfig, load_config
from semifer.data.augment import to_float
from semifer.data.imageset import conform
from semifer.engine.ema import ModelEMA
from semifer.engine.guard import BufferSnapshot, NonFiniteGuard
from semifer.engine.runlog import read_metrics
from semifer.engine.trainer import amp_dtype, make_optimizer, resolve_device, train
from semifer.labels import NUM_CLASSES
from semifer.models import build_model
from semifer.registry import BACKBONES, THRESHOLDS
from semifer.ssl import build_algorithm

MS1M_SAMPLES = 5_800_000


@dataclass
class Setup:
    """One measurement configuration (one backbone on one device)."""

    backbone: str
    size: int
    batch: int
    mu: int
    device: torch.device
    seconds: float
    warmup: int
    workers: int
    compile: bool = False
    faces: int = 256
    backbone_args: dict = field(default_factory=dict)

    @property
    def images_per_step(self) -> int:
        return self.batch * (1 + 2 * self.mu)

    @property
    def unlabeled_size(self) -> int:
        # At least two unlabeled batches, so indices inside one batch are distinct.
        return max(self.faces, 2 * self.batch * self.mu)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(fn, s: Setup, extra_warmup: int = 0) -> tuple[int, float]:
    """Run ``fn(i)`` for warm-up steps, then for at least ``s.seconds``; (measured steps, seconds)."""
    for i in range(s.warmup + extra_warmup):
        fn(i)
    sync(s.device)
    t0, n = time.perf_counter(), 0
    while n < 2 or time.perf_counter() - t0 < s.seconds:
        fn(s.warmup + extra_warmup + n)
        n += 1
    sync(s.device)
    return n, time.perf_counter() - t0


# ----------------------------------------------------------------------------- data


def make_faces(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic uint8 faces (N, 3, size, size) with their classes, decoded once, in memory."""
    from semifer.data.synthetic import render_faces

    split = render_faces(n, size=min(max(size, 32), 128), seed=seed)  # the renderer's size range
    images = conform(split.images, size, 3)
    return images.numpy(), split.labels.numpy()


def write_npz_sources(s: Setup, images: np.ndarray, labels: np.ndarray, root: Path) -> dict[str, str]:
    """labeled / unlabeled (labels hidden, tiled to ``s.unlabeled_size``) / val as ``npz:`` specs."""
    reps = -(-s.unlabeled_size // len(images))
    unl = np.concatenate([images] * reps)[: s.unlabeled_size]
    np.savez(root / "labeled.npz", images=images, labels=labels)
    np.savez(root / "unlabeled.npz", images=unl, labels=np.full(len(unl), -1))
    np.savez(root / "val.npz", images=images[:64], labels=labels[:64])
    return {k: f"npz:{root / k}.npz" for k in ("labeled", "unlabeled", "val")}


def bench_config(s: Setup, out: Path, steps: int = 1, data: dict | None = None, log_every: int = 1) -> TrainConfig:
    """DTM with the project defaults, this backbone, batch and mu; no evaluation or checkpoint mid-run."""
    base = {
        "model": {"backbone": s.backbone, "backbone_args": s.backbone_args},
        "ssl": {"algorithm": "dtm", "mu": s.mu, "warmup_steps": 0},
        "optim": {"batch_size": s.batch, "steps": steps, "compile": s.compile},
        "run": {"out": str(out), "device": str(s.device), "progress": False, "log_every": log_every,
                "eval_every": steps, "checkpoint_every": steps},
        "data": {"image_size": s.size, "channels": 3, "rest_as_unlabeled": False},
    }
    if data is not None:
        base["data"].update(labeled=data["labeled"], unlabeled=[data["unlabeled"]], val=data["val"])
    return load_config(base=base)


# ----------------------------------------------------------------------------- the step


class StepRunner:
    """The trainer's step without its data source (same functions as semifer.engine.train)."""

    def __init__(self, s: Setup) -> None:
        cfg = bench_config(s, Path("unused"))
        dev = s.device
        self.amp = amp_dtype(cfg.optim.amp, dev)
        self.model = build_model(cfg.model, NUM_CLASSES, in_chans=3).to(dev)
        if self.amp is not None:  # the trainer's optim.channels_last: auto
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = ModelEMA(self.model, cfg.ssl.ema_decay).to(dev)
        if s.compile:
            self.model.compile()
            self.ema.module.compile()
        counts = torch.full((NUM_CLASSES,), max(1, s.faces // NUM_CLASSES))
        self.algo = build_algorithm(cfg.ssl, NUM_CLASSES, counts, num_unlabeled=s.unlabeled_size).to(dev)
        self.opt = make_optimizer(cfg.optim, self.model, fused=dev.type == "cuda")
        self.guard = NonFiniteGuard(cfg.optim.max_nonfinite_steps)
        self.snapshot = BufferSnapshot(self.model, self.ema.module)
        self.device = dev
        self.model.train()

    def __call__(self, batch: dict, step: int) -> None:
        self.snapshot.take()
        with torch.autocast(self.device.type, dtype=self.amp or torch.bfloat16, enabled=self.amp is not None):
            loss, _ = self.algo.step(self.model, self.ema, batch, step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None],
                                             foreach=True)
        if self.guard.step_ok(loss, norm, step):  # the trainer's one host sync per step
            self.opt.step()
            self.ema.update(self.model, step)
        else:
            self.snapshot.restore()


# ----------------------------------------------------------------------------- (a)


def measure_model_bound(s: Setup) -> float:
    """(a) img/s of the step on random float views that already live on the device."""
    runner = StepRunner(s)
    B, U, S, dev = s.batch, s.batch * s.mu, s.size, s.device
    g = torch.Generator(device=dev).manual_seed(0)
    batch = {"x_l": torch.rand(B, 3, S, S, device=dev, generator=g),
             "y_l": torch.randint(0, NUM_CLASSES, (B,), device=dev, generator=g),
             "x_uw": torch.rand(U, 3, S, S, device=dev, generator=g),
             "x_us": torch.rand(U, 3, S, S, device=dev, generator=g),
             "idx_u": torch.randperm(s.unlabeled_size, device=dev, generator=g)[:U]}
    n, dt = timed_steps(lambda i: runner(batch, i), s)
    return n * s.images_per_step / dt


# ----------------------------------------------------------------------------- (b)


def measure_device_pipeline(s: Setup, data: dict[str, str], workdir: Path, est_step_s: float) -> float:
    """(b) img/s of semifer.engine.train itself (DTM, npz sources), from its metrics.jsonl.

    The step count is sized from (a)'s step time to last about ``s.seconds`` at (a)'s speed;
    records are windows of ``log_every`` equal steps, so the overall rate is their harmonic mean.
    """
    n_meas = max(2, math.ceil(s.seconds / max(est_step_s, 1e-6)))
    log_every = max(1, min(20, n_meas // 4))
    n_meas = -(-n_meas // log_every) * log_every
    warm = max(1, -(-s.warmup // log_every)) * log_every
    cfg = bench_config(s, workdir / f"run-{s.backbone}", steps=warm + n_meas, data=data, log_every=log_every)
    result = train(cfg)
    rates = [r["img_per_s"] for r in read_metrics(result.run_dir) if r["kind"] == "train" and r["step"] > warm]
    if not rates:
        raise RuntimeError(f"no train records after step {warm} in {result.run_dir}")
    return len(rates) / sum(1.0 / r for r in rates)


# ----------------------------------------------------------------------------- (c)


class PilViews(torch.utils.data.Dataset):
    """USB-style per-sample CPU augmentation: item i = one labeled weak view + mu unlabeled (weak, strong).

    Each image is decoded from JPEG once per item; the unlabeled strong view starts from the same
    decoded image as its weak view. Outputs stay uint8 (collated, pinned, copied, made float on the
    device), which is the cheapest possible hand-over for this pipeline.
    """

    def __init__(self, jpegs: list[bytes], labels: np.ndarray, mu: int, size: int, unlabeled_size: int) -> None:
        from torchvision import transforms as T

        self.jpegs, self.labels, self.mu, self.n_u = jpegs, labels, mu, unlabeled_size
        pad = int(0.125 * size)
        self.weak = T.Compose([T.RandomHorizontalFlip(), T.RandomCrop(size, padding=pad, padding_mode="reflect")])
        self.randaugment = T.RandAugment(num_ops=2, magnitude=10)
        self.to_tensor = T.PILToTensor()
        self.cutout = T.RandomErasing(p=1.0, scale=(0.0, 0.25), ratio=(1.0, 1.0), value=127)

    def __len__(self) -> int:
        return 1 << 30  # an endless stream; the benchmark stops it

    def _decode(self, i: int):
        from PIL import Image

        return Image.open(io.BytesIO(self.jpegs[i % len(self.jpegs)])).convert("RGB")

    def __getitem__(self, i: int) -> dict:
        lab = self.to_tensor(self.weak(self._decode(i)))
        uw, us, idx = [], [], []
        for j in range(self.mu):
            k = (i * self.mu + j) % self.n_u
            img = self.weak(self._decode(k))
            uw.append(self.to_tensor(img))
            us.append(self.cutout(self.to_tensor(self.randaugment(img))))
            idx.append(k)
        return {"x_l": lab, "y_l": int(self.labels[i % len(self.labels)]), "x_uw": torch.stack(uw),
                "x_us": torch.stack(us), "idx_u": torch.tensor(idx)}


def jpeg_bytes(images: np.ndarray, quality: int = 90) -> list[bytes]:
    from PIL import Image

    out = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im.transpose(1, 2, 0)).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def measure_cpu_pipeline(s: Setup, images: np.ndarray, labels: np.ndarray) -> float:
    """(c) img/s of step (a) fed by a PIL DataLoader (workers, pinned memory on CUDA, prefetch 2)."""
    ds = PilViews(jpeg_bytes(images), labels, s.mu, s.size, s.unlabeled_size)
    cuda = s.device.type == "cuda"
    kw = dict(persistent_workers=True, prefetch_factor=2) if s.workers > 0 else {}
    loader = torch.utils.data.DataLoader(ds, batch_size=s.batch, num_workers=s.workers, pin_memory=cuda, **kw)
    it, runner, dev = iter(loader), StepRunner(s), s.device

    def step(i: int) -> None:
        b = next(it)
        put = lambda t: t.to(dev, non_blocking=True)  # noqa: E731
        batch = {"x_l": to_float(put(b["x_l"])), "y_l": put(b["y_l"]),
                 "x_uw": to_float(put(b["x_uw"]).flatten(0, 1)), "x_us": to_float(put(b["x_us"]).flatten(0, 1)),
                 "idx_u": put(b["idx_u"]).flatten()}
        runner(batch, i)

    try:
        # Extra warm-up drains the batches the workers queued during start-up, so the
        # measured rate is the steady state, not a full prefetch queue.
        n, dt = timed_steps(step, s, extra_warmup=2 * s.workers)
    finally:
        it._shutdown_workers()  # persistent workers would otherwise live as long as the loader
    return n * s.images_per_step / dt


# ----------------------------------------------------------------------------- (d)


def measure_threshold_update(s: Setup, num_samples: int = MS1M_SAMPLES, reps: int = 50) -> float:
    """(d) ms per step of the DTM policy's ``update`` + ``mask`` with an indexed status of ``num_samples``."""
    cfg = bench_config(s, Path("unused")).ssl
    dev, U = s.device, s.batch * s.mu
    policy = THRESHOLDS.get("dtm_flex")(NUM_CLASSES, tau=cfg.tau, tau_min=cfg.tau_min, tau_max=cfg.tau_max,
                                   mode="indexed", num_samples=num_samples).to(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    probs = (3 * torch.randn(U, NUM_CLASSES, device=dev, generator=g)).softmax(1)
    perm = torch.randperm(num_samples, device=dev, generator=g)
    batches = [perm[(r * U) % (num_samples - U):][:U] for r in range(reps + 5)]

    def once(r: int) -> None:
        policy.update(probs, batches[r])
        policy.mask(probs, batches[r])

    for r in range(5):
        once(r)
    sync(dev)
    t0 = time.perf_counter()
    for r in range(5, reps + 5):
        once(r)
    sync(dev)
    return 1000 * (time.perf_counter() - t0) / reps


# ----------------------------------------------------------------------------- driver


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def run_backbone(s: Setup, workdir: Path, log=print) -> dict:
    """All four measurements for one backbone; a row of ``throughput.json``."""
    log(f"[{s.backbone}] rendering {s.faces} synthetic faces at {s.size} px")
    images, labels = make_faces(s.faces, s.size)
    data = write_npz_sources(s, images, labels, workdir)
    log(f"[{s.backbone}] (a) model-bound step")
    a = measure_model_bound(s)
    step_ms = 1000 * s.images_per_step / a
    log(f"[{s.backbone}] (b) semifer.engine.train with the device pipeline")
    b = measure_device_pipeline(s, data, workdir, step_ms / 1000)
    log(f"[{s.backbone}] (c) PIL DataLoader pipeline, {s.workers} workers")
    c = measure_cpu_pipeline(s, images, labels)
    log(f"[{s.backbone}] (d) DTM threshold update at {MS1M_SAMPLES:,} samples")
    d = measure_threshold_update(s)
    return {"backbone": s.backbone, "size": s.size, "batch": s.batch, "mu": s.mu,
            "images_per_step": s.images_per_step, "model_bound_img_s": a, "device_pipeline_img_s": b,
            "cpu_pipeline_img_s": c, "threshold_update_ms": d, "step_ms": step_ms,
            "threshold_share": d / step_ms, "device_vs_model_bound": b / a, "device_vs_cpu_pipeline": b / c}


def markdown_table(report: dict) -> str:
    lines = [f"device: {report['device']} (torch {report['torch']}, amp {report['amp']}, compile {report['compile']})",
             "", "| backbone | px | batch (1+2mu) | (a) model-bound img/s | (b) device pipeline img/s | "
             "(c) CPU pipeline img/s | (b)/(a) | (b)/(c) | threshold ms / step ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        lines.append(f"| {r['backbone']} | {r['size']} | {r['images_per_step']} | {r['model_bound_img_s']:,.0f} | "
                     f"{r['device_pipeline_img_s']:,.0f} | {r['cpu_pipeline_img_s']:,.0f} | "
                     f"{r['device_vs_model_bound']:.2f} | {r['device_vs_cpu_pipeline']:.2f} | "
                     f"{r['threshold_update_ms']:.3f} / {r['step_ms']:.1f} ({100 * r['threshold_share']:.2f} %) |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for throughput.json")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured seconds per rate (after warm-up)")
    ap.add_argument("--backbones", default="resnet18,ir50", help="comma-separated; unknown names are skipped")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--batch", type=int, default=None, help="labeled images per step (default: 128 CUDA, 16 CPU)")
    ap.add_argument("--mu", type=int, default=3, help="unlabeled : labeled ratio")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers for (c)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3, 10 with --compile)")
    ap.add_argument("--faces", type=int, default=256, help="distinct synthetic faces rendered per backbone")
    ap.add_argument("--compile", action="store_true", help="torch.compile the student and teacher (optim.compile)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    dev = resolve_device(a.device)
    batch = a.batch or (128 if dev.type == "cuda" else 16)
    warmup = a.warmup if a.warmup is not None else (10 if a.compile else 3)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"device": device_name(dev), "device_type": dev.type, "torch": torch.__version__,
              "commit": git_commit(), "command": " ".join(["python", *sys.argv]) if argv is None else None,
              "amp": str(amp_dtype("auto", dev)), "compile": a.compile, "workers": a.workers,
              "seconds": a.seconds, "warmup_steps": warmup, "runs": []}
    for name in [b.strip() for b in a.backbones.split(",") if b.strip()]:
        if name not in BACKBONES:
            print(f"skipping {name}: not a registered backbone (semifer backbones)")
            continue
        s = Setup(name, a.size, batch, a.mu, dev, a.seconds, warmup, a.workers, a.compile, a.faces)
        with tempfile.TemporaryDirectory(prefix="semifer-throughput-") as tmp:
            report["runs"].append(run_backbone(s, Path(tmp)))
        (out / "throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_table(report))
    return report


if __name__ == "__main__":
    main()
