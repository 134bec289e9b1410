"""Checkpoint files: plain dicts of state_dicts and numbers, written atomically.

Files are loaded with ``torch.load(weights_only=True)``: nothing is ever unpickled,
so a checkpoint from anywhere cannot run code.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def atomic_save(obj: Any, path: Path | str) -> None:
    """Write ``obj`` to a temp file in the same folder, fsync, then rename over ``path``.

    A kill at any moment leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict:
    """Load a semifer checkpoint safely (``weights_only=True``) with a clear error on bad files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"{path} is not a readable semifer checkpoint: {e}") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path} is not a semifer checkpoint (no 'model' entry)")
    scales = ckpt.pop("weight_scales", None)
    if scales:
        # int8 weights of a bundled model (semifer.bundled.storage_state): back to float32
        missing = [k for k in scales if k not in ckpt["model"]]
        if missing:
            raise ValueError(f"{path}: weight scales for tensors it does not hold: {missing[:3]}")
        ckpt["model"] = {k: v.float() * scales[k].float() if k in scales else v for k, v in ckpt["model"].items()}
    return ckpt
