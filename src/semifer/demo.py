"""``semifer demo``: supervised vs semi-supervised training on the embedded synthetic faces.

Every algorithm gets the same backbone, labeled batch, schedule, seed and number
of steps; only what it does with the unlabeled faces differs.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from semifer.config import load_config, to_dict
from semifer.engine import train
from semifer.engine.runlog import to_plain

DEMO_STEPS = 800

# Shared settings: small CNN at 48 px, labeled batch 32, mu 3 (96 unlabeled faces per step).
DEMO_BASE: dict = {
    "data": {"labeled": "synthetic:labeled", "unlabeled": ["synthetic:unlabeled"], "val": "synthetic:val",
             "test": "synthetic:test", "image_size": 48, "synthetic_labeled_per_class": 25,
             "synthetic_unlabeled": 6000, "synthetic_val_per_class": 50, "synthetic_test_per_class": 100},
    "model": {"backbone": "small_cnn", "backbone_args": {"width": 16}},
    "optim": {"lr": 0.03, "batch_size": 32, "steps": DEMO_STEPS},
    "ssl": {"mu": 3, "tau": 0.95, "ema_decay": 0.99, "status_momentum": 0.99,
            "warmup_steps": 100, "ramp_steps": 100},
    "run": {"log_every": 10, "eval_every": 50, "checkpoint_every": 100},
}


def demo_config(algorithm: str, out: Path, steps: int | None = None, threads: int = 0):
    """The demo's config for one algorithm (the same for all but ``ssl.algorithm``)."""
    base = json.loads(json.dumps(DEMO_BASE))
    if threads:
        base["run"]["threads"] = threads
    base["ssl"]["algorithm"] = algorithm
    base["run"]["out"] = str(out / algorithm)
    if steps is not None:
        base["optim"]["steps"] = steps
    return load_config(base=base)


def run_demo(out: Path, algorithms: list[str] | None = None, steps: int | None = None, threads: int = 0) -> dict:
    """Train each algorithm on the synthetic faces, print a table, write ``out/results.json``."""
    algorithms = algorithms or ["supervised", "dtm"]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results: dict = {}
    for name in algorithms:
        cfg = demo_config(name, out, steps, threads)
        res = train(cfg)
        # Checkpoints are chosen on synthetic:val; the table reports the chosen one on synthetic:test.
        results[name] = {"macro_f1": res.test["macro_f1"], "accuracy": res.test["accuracy"],
                         "val_macro_f1": res.macro_f1, "best_step": res.best_step, "steps": res.steps,
                         "train_wall_s": res.wall_s, "run_dir": str(res.run_dir),
                         "per_class_f1": res.test["per_class_f1"]}
    wall = time.perf_counter() - t0
    summary = {"algorithms": results, "wall_s": wall, "config": to_dict(demo_config("dtm", out, steps))}
    (out / "results.json").write_text(json.dumps(to_plain(summary), indent=2))
    print()
    print(format_table(results))
    print(f"\nwall time {wall:.0f} s; results in {out / 'results.json'}")
    for name, r in results.items():
        print(f"plots for {name}: {Path(r['run_dir']) / 'plots'}")
    return summary


def format_table(results: dict) -> str:
    """Markdown table: test macro-F1 and accuracy of each algorithm's checkpoint chosen on val."""
    lines = ["| algorithm | test macro-F1 | test accuracy | val macro-F1 | chosen step | train s |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['macro_f1']:.3f} | {r['accuracy']:.3f} | {r['val_macro_f1']:.3f} | "
                     f"{r['best_step']} | {r['train_wall_s']:.0f} |")
    return "\n".join(lines)
