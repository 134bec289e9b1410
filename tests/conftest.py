"""Shared fixtures: tiny generated data sets and configs, so core tests need nothing on disk."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# A fixed thread count: semifer otherwise picks threads from the machine's load, and results
# depend slightly on the thread count (docs/performance.md). Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "2")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def stripes(n_per_class: int, seed: int, size: int = 24, classes: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class is the period of horizontal stripes (flip and shift invariant, learnable fast)."""
    rng = np.random.default_rng(seed)
    periods = np.array([2, 3, 4, 5, 6, 8, 10, 12])[:classes]
    labels = np.repeat(np.arange(classes), n_per_class)
    rows = np.arange(size)[None, :]
    phase = rng.uniform(0, 2 * np.pi, (len(labels), 1))
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * rows / periods[labels][:, None] + phase)  # (N, size)
    contrast = rng.uniform(0.5, 1.0, (len(labels), 1))
    img = 40 + 170 * contrast * wave
    img = np.repeat(img[:, :, None], size, axis=2)[..., None] * rng.uniform(0.7, 1.0, (len(labels), 1, 1, 3))
    img = img + rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), labels


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, str]:
    """``npz:`` sources: labeled (6/class), unlabeled (240, labels hidden) and val (10/class)."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for name, n, seed in (("labeled", 6, 1), ("unlabeled", 30, 2), ("val", 10, 3)):
        images, labels = stripes(n, seed)
        if name == "unlabeled":
            labels = np.full_like(labels, -1)
        np.savez(root / f"{name}.npz", images=images, labels=labels)
        out[name] = f"npz:{root / name}.npz"
    return out


def tiny_config(tiny_data: dict, out: Path, algorithm: str = "dtm", steps: int = 6, **sections):
    """A fast config on the tiny data; ``sections`` override config sections (dicts)."""
    from semifer.config import load_config

    base = {
        "data": {"labeled": tiny_data["labeled"], "unlabeled": [tiny_data["unlabeled"]], "val": tiny_data["val"],
                 "image_size": 24},
        "model": {"backbone": "small_cnn", "backbone_args": {"width": 8}},
        "ssl": {"algorithm": algorithm, "mu": 2, "tau": 0.5, "tau_min": 0.3, "warmup_steps": 0},
        "optim": {"batch_size": 16, "steps": steps, "lr": 0.05},
        "run": {"out": str(out), "log_every": 2, "eval_every": 3, "checkpoint_every": 3, "progress": False},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return load_config(base=base)
