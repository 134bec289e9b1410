"""``train()``: build a run, resume it, step it, write its results and plots.

The pieces have their own homes: engine/setup.py builds the data, model, teacher,
algorithm and optimizer and resumes them (one function); engine/loop.py steps;
engine/optim.py holds the optimizer and schedule. This file ties them together.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from semifer import dist
from semifer.config import TrainConfig
from semifer.engine.loop import run_steps
from semifer.engine.optim import lr_at, make_optimizer, set_fused
from semifer.engine.rundir import prepare_run_dir
from semifer.engine.runlog import RunLogger, to_plain
from semifer.engine.setup import BEST, LAST, build_run, is_streamed_spec, resume

__all__ = ["BEST", "LAST", "RESULTS", "RunResult", "amp_dtype", "is_streamed_spec", "lr_at", "make_optimizer",
           "resolve_device", "set_fused", "train"]

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
    test: dict | None = None    # data.test scores of the checkpoint selected on val (when data.test is set)

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


def train(cfg: TrainConfig, *, stop_after: int | None = None) -> RunResult:
    """Train (or resume) the run described by ``cfg``; returns the best checkpoint's scores.

    Re-running with the same ``cfg.run.out`` resumes from the last checkpoint and
    ends with exactly the weights an uninterrupted run would have. ``stop_after``
    ends this invocation after that many steps (with a checkpoint), for time-sliced jobs.
    """
    dist.init_from_env()
    device = resolve_device(cfg.run.device)
    if device.type == "cpu":
        from semifer.engine.threads import apply_threads
        apply_threads(cfg.run.threads, verbose=dist.is_main())
    # Rank 0 writes config.yaml first; the others compare against the finished file, not a half-written one.
    run_dir = prepare_run_dir(cfg, write=True) if dist.is_main() else None
    dist.barrier()
    run_dir = run_dir or prepare_run_dir(cfg, write=False)
    torch.manual_seed(cfg.run.seed)
    run = build_run(cfg, run_dir, device, amp_dtype(cfg.optim.amp, device))
    state = resume(run)
    logger = RunLogger(run_dir, enabled=dist.is_main(), resume_step=state.step if state.step > 0 else None)
    skipped = run.skipped
    if state.step == 0:
        logger.log({"kind": "info", "step": 0, "labeled": len(run.labeled), "val": len(run.val),
                    "val_source": cfg.data.val or f"{cfg.data.val_fraction:g} of {cfg.data.labeled} (split.json)",
                    "holdout": len(run.holdout) if run.holdout is not None else 0,
                    "unlabeled": run.num_unlabeled if run.num_unlabeled is not None else "streamed",
                    "device": str(device), "threads": torch.get_num_threads(), "world_size": dist.world_size(), "amp": str(run.amp), "skipped": skipped,
                    **({"pretrained": run.pretrained.as_dict()} if run.pretrained is not None else {})})
    total = cfg.optim.steps
    end = total if stop_after is None else min(total, state.step + stop_after)
    bar = None
    if cfg.run.progress and dist.is_main() and state.step < end:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=state.step, desc=f"{cfg.ssl.algorithm}", unit="step", dynamic_ncols=True)
    run_steps(run, state, logger, end, bar)
    if bar is not None:
        bar.close()
    unl_src = run.unl_src
    if unl_src is not None and hasattr(unl_src, "close"):  # a streamed source: its workers found bad files
        if unl_src.skipped:
            skipped["unlabeled stream"] = dict(unl_src.skipped)
            logger.log({"kind": "info", "step": state.step, "unlabeled_skipped": dict(unl_src.skipped)})
        unl_src.close()
    completed = state.step >= total
    best, step, wall_s = state.best, state.step, state.wall_s
    plots: list[Path] = []
    test = None
    if dist.is_main():
        if completed:
            test = score_test(run) if cfg.data.test else None
            _write_results(run_dir, cfg, best, step, wall_s, skipped, test)
        for name, counts in skipped.items():
            print(f"semifer: {name}: skipped {sum(counts.values())} unusable inputs {counts}")
        logger.log({"kind": "info", "step": step, "event": "end", "completed": completed, "wall_s": wall_s})
        logger.close()
        from semifer.engine.plots import write_plots
        plots = write_plots(run_dir)
    else:
        logger.close()
    return RunResult(run_dir, cfg.ssl.algorithm, step, completed, int(best.get("step", -1)),
                     {k: v for k, v in best.items() if k != "step"}, wall_s, plots, test)


def score_test(run) -> dict:
    """Scores on ``data.test`` of the checkpoint selected on val (best.pt), computed once at the end."""
    from semifer.data.formats import load_source
    from semifer.engine.checkpoint import load_checkpoint
    from semifer.eval.evaluate import evaluate_model

    cfg = run.cfg
    test = load_source(cfg.data.test, cfg.data)
    if len(test) == 0 or (test.labels < 0).any():
        raise ValueError(f"data.test = {cfg.data.test!r}: needs labeled images ({len(test)} found)")
    ck = load_checkpoint(run.run_dir / BEST, map_location=run.device)
    model = run.ema.module
    model.load_state_dict(ck["model"])
    scores = evaluate_model(model, test.images, test.labels, batch_size=cfg.run.eval_batch_size,
                            device=run.device, amp_dtype=run.amp)
    return {"data": cfg.data.test, "checkpoint_step": int(ck["step"]), **scores}


def _write_results(run_dir: Path, cfg: TrainConfig, best: dict, steps: int, wall_s: float,
                   skipped: dict | None = None, test: dict | None = None) -> None:
    out = {"algorithm": cfg.ssl.algorithm, "steps": steps, "wall_s": wall_s, "best_step": best.get("step"),
           "macro_f1": best.get("macro_f1"), "accuracy": best.get("accuracy"),
           "per_class_f1": best.get("per_class_f1"), "confusion": best.get("confusion"),
           "val": cfg.data.val or f"{cfg.data.val_fraction:g} of {cfg.data.labeled} (split.json)",
           "skipped": skipped or {}, **({"test": test} if test is not None else {})}
    tmp = run_dir / (RESULTS + ".tmp")
    tmp.write_text(json.dumps(to_plain(out), indent=2))
    tmp.replace(run_dir / RESULTS)
