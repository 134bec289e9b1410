"""Wall time of ``semifer pseudolabel`` / ``predict`` over 1 process and over torchrun ranks.

    python benchmarks/shard_speed.py [--images 500] [--procs 2] [--backbone resnet18] [--size 112]

Writes ``--images`` generated face-sized JPEGs and an untrained checkpoint under ``--dir``,
then runs each command with one process (1 torch thread, then torch's default of one per
core) and with ``torchrun --standalone --nproc-per-node PROCS`` (1 thread per rank; fresh output
folders, process start and model load included) and checks that the merged file equals the
one-process file. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def _setup(root: Path, images: int, backbone: str, size: int) -> tuple[Path, Path]:
    import torch

    from semifer.config import load_config, to_dict
    from semifer.engine.checkpoint import atomic_save
    from semifer.labels import ABAW_LABELS
    from semifer.models import build_model

    imgs = root / f"imgs{images}"
    if not imgs.is_dir():
        rng = np.random.default_rng(0)
        tmp = root / "imgs.tmp"
        for i in range(images):
            sub = tmp / f"{i // 100:03d}"
            sub.mkdir(parents=True, exist_ok=True)
            arr = np.clip(rng.normal(120, 50, (112, 112, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(sub / f"{i:06d}.jpg", quality=90)
        tmp.rename(imgs)
    ckpt = root / f"{backbone}_{size}.pt"
    if not ckpt.is_file():
        cfg = load_config(base={"data": {"image_size": size, "channels": 3}, "model": {"backbone": backbone}})
        torch.manual_seed(0)
        model = build_model(cfg.model, len(ABAW_LABELS), in_chans=3)
        atomic_save({"model": model.state_dict(), "step": 0, "config": to_dict(cfg), "labels": list(ABAW_LABELS)},
                    ckpt)
    return imgs, ckpt


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def _same(a: Path, b: Path) -> str:
    ra, rb = _rows(a), _rows(b)
    if len(ra) != len(rb) or any(x[:2] != y[:2] for x, y in zip(ra, rb)):
        return "rows differ"
    worst = 0.0
    for x, y in zip(ra[1:], rb[1:]):
        for u, v in zip(x, y):
            try:
                worst = max(worst, abs(float(u) - float(v)))
            except ValueError:
                pass
    return f"same rows, max |diff| {worst:.0e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/semifer_shard_bench")
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--commands", default="pseudolabel,predict")
    a = ap.parse_args()
    root = Path(a.dir)
    root.mkdir(parents=True, exist_ok=True)
    imgs, ckpt = _setup(root, a.images, a.backbone, a.size)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    print(f"{a.images} images, {a.backbone} at {a.size} px, untrained; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print("| command | processes | torch threads | wall s | images/s | check |\n|---|---:|---|---:|---:|---|")
    for cmd in a.commands.split(","):
        if cmd == "pseudolabel":
            args, name = ["pseudolabel", "--checkpoint", str(ckpt), "--unlabeled", f"folder:{imgs}"], "pseudolabels.csv"
        else:
            args, name = ["predict", str(ckpt), str(imgs), "--detector", "whole"], "predictions.csv"
        first = None
        # torch threads: torchrun sets OMP_NUM_THREADS=1 per rank; one process is run with 1 and
        # with torch's default (one per core)
        for procs, threads in ((1, "1"), (1, None), (a.procs, None)):
            out = root / f"out_{cmd}_{procs}_{time.time_ns()}"
            launch = ([sys.executable, "-m"] if procs == 1
                      else [torchrun, "--standalone", f"--nproc-per-node={procs}", "-m"])
            env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
            if threads:
                env["OMP_NUM_THREADS"] = threads
            t = time.perf_counter()
            subprocess.run([*launch, "semifer.cli", *args, "--out", str(out), "--quiet"], check=True,
                           stdout=subprocess.DEVNULL, env=env)
            wall = time.perf_counter() - t
            first = first or out / name
            check = _same(first, out / name) if out / name != first else ""
            shown = threads or ("1 each" if procs > 1 else "default")
            print(f"| {cmd} | {procs} | {shown} | {wall:.1f} | {a.images / wall:.1f} | {check} |", flush=True)


if __name__ == "__main__":
    main()
