"""Face-recognition pretraining on FER2013 10 %: dlib-FR dlib_resnet34 vs random init vs small CNN.

    python benchmarks/pretrained_fer2013.py --out runs/pretrained_fer [--steps 1200] [--data ../shared/data]

Setting (as benchmarks/fer2013_ssl.py "10pct"): labeled = a class-stratified 10 % of
fer2013/train (seed 0), unlabeled = the other 90 % (labels hidden) + unlabeled_faces/,
evaluation = fer2013/val, best checkpoint by val macro-F1 (8 ABAW classes; the table also
gives the 7-class macro-F1). Rows: {dlib-FR pretrained dlib_resnet34, the same backbone
from random init, small_cnn} x {supervised, dtm}; every row gets the same steps, labeled
batch, schedule, image size and seed. dlib_resnet34 takes the 256-D pooled features
(output: pooled) and, at 48-96 px, pads its strided layers (padding: auto); FER2013 is
grayscale, so its RGB stem is summed to one channel (docs/backbones.md). Writes
DIR/results.json and prints a Markdown table. This is a script, not a test.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

from semifer.config import load_config
from semifer.engine import train
from semifer.labels import ABAW_LABELS

ROWS = {
    # name: (backbone, backbone_args, pretrained, extra model keys, extra optim keys)
    # dlib's affine layers are folded BatchNorms (scale = gamma / std): normalising with batch
    # statistics instead multiplies activations by those scales layer after layer (measured:
    # supervised loss ~800 after 4 steps), so the pretrained row keeps dlib's maps (freeze_bn).
    # Without batch normalisation its gradients are large: at lr 0.03 the loss went non-finite
    # in 2 of 4 smoke steps, so the backbone gets lr 0.003 (head 0.03) and clipped gradients.
    # Measured (600 steps, 48 px): with freeze_bn, pooled output and head lr 0.03 the loss stayed at
    # the prior's entropy (1.82) and every prediction was "happy" (macro-F1 0.050). Batch-statistics
    # BatchNorm at lr 0.003 with clipped gradients and dlib's own 128-D embedding trains (a 1,000-step
    # trial reached 0.390), so that is the row.
    "dlib_resnet34 (dlib-FR pretrained)": ("dlib_resnet34", {}, "dlib-fr", {}, {"lr": 0.003, "grad_clip": 5.0}),
    "dlib_resnet34 (random init)": ("dlib_resnet34", {"output": "pooled"}, "", {}, {}),
    "small_cnn (random init)": ("small_cnn", {"width": 16}, "", {}, {}),
}
ALGORITHMS = ["supervised", "dtm"]


def config(data: Path, out: Path, backbone: str, backbone_args: dict, pretrained: str, model_extra: dict,
           optim_extra: dict, algorithm: str, a: argparse.Namespace):
    eval_every = max(1, a.steps // 6)
    return load_config(base={
        "data": {"labeled": f"folder:{data / 'fer2013' / 'train'}", "val": f"folder:{data / 'fer2013' / 'val'}",
                 "unlabeled": [f"images:{data / 'unlabeled_faces'}"], "image_size": a.image_size, "channels": 1,
                 "labeled_fraction": 0.1, "split_seed": 0, "rest_as_unlabeled": True},
        "model": {"backbone": backbone, "backbone_args": backbone_args, "pretrained": pretrained, **model_extra},
        "ssl": {"algorithm": algorithm, "mu": a.mu, "warmup_steps": a.steps // 10, "ramp_steps": a.steps // 10},
        "optim": {"steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, **optim_extra},
        "run": {"out": str(out), "seed": 0, "eval_every": eval_every, "checkpoint_every": eval_every,
                "log_every": max(1, min(25, a.steps))},
    })


def row(res) -> dict:
    per_class = res.best.get("per_class_f1", {})
    seven = [per_class[n] for n in ABAW_LABELS if n != "Other" and n in per_class]
    return {"macro_f1": res.macro_f1, "macro_f1_7": sum(seven) / max(len(seven), 1), "accuracy": res.accuracy,
            "per_class_f1": per_class, "wall_s": res.wall_s, "steps": res.steps, "best_step": res.best_step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--steps", type=int, default=1200, help="steps for every row (default: a reduced CPU schedule)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--mu", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of the row names")
    ap.add_argument("--algorithms", default=",".join(ALGORITHMS))
    a = ap.parse_args()
    if not (a.data / "fer2013" / "train").is_dir():
        raise SystemExit(f"no FER2013 at {a.data / 'fer2013'} (see ../shared/data/README.md)")
    wanted = [r.strip() for r in a.rows.split(",") if r.strip()]
    results: dict = {}
    t0 = time.perf_counter()
    for i, name in enumerate(wanted):
        backbone, args, pretrained, extra, optim_extra = ROWS[name]
        for alg in a.algorithms.split(","):
            out = a.out / f"row{i}_{backbone}_{'pretrained' if pretrained else 'random'}" / alg
            res = train(config(a.data, out, backbone, args, pretrained, extra, optim_extra, alg, a))
            results.setdefault(name, {})[alg] = row(res)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    meta = {"commit": commit, "steps": a.steps, "image_size": a.image_size, "batch_size": a.batch_size, "mu": a.mu,
            "lr": a.lr, "total_s": time.perf_counter() - t0}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=2))
    print(f"\nFER2013 10 %, {a.steps} steps per row, {a.image_size} px gray, labeled batch {a.batch_size}, "
          f"mu {a.mu}, commit {commit}, {meta['total_s']:.0f} s total\n")
    print("| backbone | algorithm | macro-F1 (8) | macro-F1 (7) | accuracy | best step | wall s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, algs in results.items():
        for alg, r in algs.items():
            print(f"| {name} | {alg} | {r['macro_f1']:.4f} | {r['macro_f1_7']:.4f} | {r['accuracy']:.4f} "
                  f"| {r['best_step']} | {r['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
