"""Re-scoring a saved model: ``semifer evaluate RUN_DIR_OR_CHECKPOINT``."""
from __future__ import annotations

from pathlib import Path

import torch

from semifer.config import TrainConfig, from_dict
from semifer.data.formats import load_source
from semifer.engine.checkpoint import load_checkpoint
from semifer.eval.evaluate import evaluate_model
from semifer.labels import ABAW_LABELS, NUM_CLASSES
from semifer.models import build_model


def resolve_checkpoint(path: Path | str) -> Path:
    """A run directory means its best checkpoint; a file is taken as is."""
    path = Path(path)
    if path.is_dir():
        for name in ("checkpoints/best.pt", "checkpoints/last.pt"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path} holds no checkpoints/best.pt or checkpoints/last.pt")
    return path


def load_model(path: Path | str, device: str = "cpu") -> tuple[torch.nn.Module, TrainConfig, dict]:
    """Model (eval mode), its training config and the raw checkpoint from a run dir or checkpoint.

    A training-state file (``last.pt``) holds the student and the EMA teacher; the EMA weights
    are loaded, because they are what the trainer evaluates and selects (``best.pt`` stores
    them as ``model``)."""
    ckpt = load_checkpoint(resolve_checkpoint(path), map_location=device)
    if list(ckpt.get("labels", ABAW_LABELS)) != list(ABAW_LABELS):
        raise ValueError(f"{path}: checkpoint label order {ckpt.get('labels')} is not ABAW's")
    cfg = from_dict(TrainConfig, ckpt["config"])
    model = build_model(cfg.model, NUM_CLASSES, in_chans=cfg.data.channels)
    model.load_state_dict(ckpt["ema"] if "ema" in ckpt else ckpt["model"])
    return model.to(device).eval(), cfg, ckpt


def evaluate_path(path: Path | str, data: str | None = None, device: str = "cpu", batch_size: int = 512) -> dict:
    """Scores of the saved model on ``data`` (``FORMAT:PATH``; default: the run's test, else val source)."""
    model, cfg, ckpt = load_model(path, device)
    spec = data or cfg.data.test or cfg.data.val
    if not spec:
        raise ValueError(f"{path}: the run's validation split was carved from {cfg.data.labeled} (split.json) "
                         "and it names no test set; pass the data to score (--data FORMAT:PATH)")
    ds = load_source(spec, cfg.data)
    if (ds.labels < 0).any():
        raise ValueError(f"{spec}: evaluation data must be fully labeled")
    scores = evaluate_model(model, ds.images, ds.labels, batch_size=batch_size, device=device)
    return {"checkpoint": str(resolve_checkpoint(path)), "data": spec, "step": ckpt.get("step"), **scores}


def format_scores(scores: dict) -> str:
    """A small text table: macro-F1, accuracy and per-class F1."""
    lines = [f"macro-F1 {scores['macro_f1']:.4f}   accuracy {scores['accuracy']:.4f}   (n={scores['count']})"]
    lines += [f"  {name:<10} F1 {f1:.4f}" for name, f1 in scores["per_class_f1"].items()]
    return "\n".join(lines)
