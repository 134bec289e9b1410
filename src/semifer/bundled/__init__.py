"""Expression models trained by semifer and shipped inside the package (``semifer models``).

Each ``NAME.pt`` here is a checkpoint like a run's ``best.pt`` (the EMA weights as ``model``,
the resolved training config, the label order) plus a ``card``: what it was trained on, the
command, training time and its scores (docs/models.md). Loaded with ``weights_only=True``
like every checkpoint; nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = "fer2013-cnn32x2"
MODEL_SUFFIXES = {".pt", ".pth", ".onnx"}


def available(folder: Path | None = None) -> dict[str, Path]:
    """Bundled model name -> file."""
    return {p.stem: p for p in sorted((folder or BUNDLED_DIR).glob("*.pt"))}


def bundled_path(name: str | None = None, folder: Path | None = None) -> Path:
    """File of bundled model ``name`` (default: ``DEFAULT_MODEL``, else the only one there is)."""
    models = available(folder)
    if not models:
        raise FileNotFoundError("this install has no bundled model; pass a run directory, checkpoint or .onnx "
                                "file (train one with semifer train)")
    if name is None:
        name = DEFAULT_MODEL if DEFAULT_MODEL in models else sorted(models)[0]
    if name not in models:
        raise FileNotFoundError(f"no bundled model {name!r}; bundled: {', '.join(models)}")
    return models[name]


def looks_like_model(spec: str, folder: Path | None = None) -> bool:
    """True for a bundled model name, a checkpoint / .onnx file or a run directory (not for media)."""
    p = Path(spec)
    if spec in available(folder) or p.suffix.lower() in MODEL_SUFFIXES:
        return True
    return p.is_dir() and ((p / "checkpoints").is_dir() or (p / "config.yaml").is_file())


def resolve_model(spec: str | Path | None = None, folder: Path | None = None) -> Path:
    """A model argument -> a path: None = the default bundled model, an existing path as it is,
    else a bundled model's name."""
    if spec is None:
        return bundled_path(None, folder)
    if Path(spec).exists():
        return Path(spec)
    if str(spec) in available(folder):
        return bundled_path(str(spec), folder)
    names = ", ".join(available(folder)) or "none in this install"
    raise FileNotFoundError(f"{spec}: no such run directory, checkpoint or .onnx file, and no bundled model of "
                            f"that name (bundled: {names})")


def card(name: str | None = None, folder: Path | None = None) -> dict:
    """A bundled model's card (name, file, size, data, preprocessing, scores...)."""
    from semifer.engine.checkpoint import load_checkpoint

    path = bundled_path(name, folder)
    ck = load_checkpoint(path)
    data = ck["config"]["data"]
    return {"name": path.stem, "file": str(path), "bytes": path.stat().st_size, "step": ck.get("step"),
            "backbone": ck["config"]["model"]["backbone"], "input": f"{data['image_size']} px, {data['channels']} channel(s)",
            "face_frame": data.get("face_frame", "arcface112"), **ck.get("card", {})}


def prior_adjustment(logits, labels, prior, taus=(0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)) -> tuple[float, dict]:
    """Post-hoc logit adjustment (Menon et al., ICLR 2021) chosen for macro-F1 on a held-out slice.

    Scores ``argmax(logits - tau * log prior)`` for each ``tau`` on (``logits``, ``labels``), with
    ``prior`` the training class shares (classes with no training faces are left alone), and
    returns the ``tau`` with the best macro-F1 over the classes present (the smallest on ties)
    and every tau's score. ``tau`` = 1 is the balanced decision rule; 0 leaves the model as trained.
    """
    import numpy as np
    import torch

    from semifer.eval.metrics import classification_scores
    from semifer.labels import ABAW_LABELS

    logits = torch.as_tensor(logits).float()
    y = np.asarray(labels)
    log_prior = torch.as_tensor(prior).float().clamp_min(0).log()
    seen = torch.isfinite(log_prior)
    present = sorted(set(y.tolist()))
    scores = {}
    for tau in taus:
        pred = (logits - tau * torch.where(seen, log_prior, torch.zeros_like(log_prior))).argmax(1).numpy()
        per = classification_scores(y, pred, ABAW_LABELS)["per_class_f1"]
        scores[float(tau)] = float(np.mean([per[ABAW_LABELS[i]] for i in present]))
    best = max(scores, key=lambda t: (round(scores[t], 6), -t))
    return best, scores


def adjustment_bias(prior, tau: float):
    """The head-bias change that applies ``logits - tau * log prior`` (zero for unseen classes)."""
    import torch

    log_prior = torch.as_tensor(prior).float().clamp_min(0).log()
    return torch.where(torch.isfinite(log_prior), -tau * log_prior, torch.zeros_like(log_prior))


def ensemble_checkpoint(checkpoints: list, out: Path | str, weights: list[float] | None = None) -> Path:
    """Write one checkpoint (like a run's ``best.pt``) whose model is the weighted mean of the
    models in ``checkpoints`` (run dirs, checkpoint files or bundled names): the ``ensemble``
    backbone (:mod:`semifer.models.ensemble`). The members must share their input (size,
    channels, face frame); the first member's config supplies everything else."""
    import copy

    from semifer.config import to_dict
    from semifer.engine.checkpoint import atomic_save
    from semifer.eval.report import load_model
    from semifer.labels import ABAW_LABELS
    from semifer.models.ensemble import combine

    loaded = [load_model(resolve_model(c), "cpu") for c in checkpoints]
    first = loaded[0][1]
    for c, (_, cfg, _) in zip(checkpoints, loaded):
        got = (cfg.data.image_size, cfg.data.channels, cfg.data.face_frame)
        want = (first.data.image_size, first.data.channels, first.data.face_frame)
        if got != want:
            raise ValueError(f"{c}: input (size, channels, face frame) {got} differs from the first member's {want}")
    specs = [{"backbone": cfg.model.backbone, "backbone_args": cfg.model.backbone_args} for _, cfg, _ in loaded]
    args, state = combine([m for m, _, _ in loaded], specs, weights)
    cfg = copy.deepcopy(first)
    cfg.model.backbone, cfg.model.backbone_args = "ensemble", args
    cfg.model.pretrained = ""   # the weights are in the checkpoint
    members = [str(c) for c in checkpoints]
    atomic_save({"model": state, "config": to_dict(cfg), "labels": list(ABAW_LABELS), "step": None,
                 "ensemble": {"members": members, "weights": None if weights is None else list(map(float, weights))}},
                Path(out))
    return Path(out)


HALF_MIN_NUMEL = 1024   # tensors at least this big (conv / linear weights) are stored compressed
WEIGHT_STORAGE = ("float32", "float16", "int8")


def storage_state(state: dict, weights: str = "float16") -> tuple[dict, dict]:
    """(state, scales): a state dict as a bundled file stores it. Every floating tensor of at least
    ``HALF_MIN_NUMEL`` elements is stored as ``weights``: float16 (relative rounding 5e-4), or
    int8 with one float32 scale per output channel (``scales[key]``; symmetric, |w| max -> 127),
    for tensors of two or more dimensions (conv and linear weights; others go float16). Biases and
    batch-norm statistics stay float32 (a running variance can fall below float16's normal range).
    :func:`semifer.engine.checkpoint.load_checkpoint` turns them back into float32."""
    import torch

    if weights not in WEIGHT_STORAGE:
        raise ValueError(f"weights must be one of {WEIGHT_STORAGE}, got {weights!r}")
    out, scales = {}, {}
    for k, v in state.items():
        if weights != "float32" and v.is_floating_point() and v.numel() >= HALF_MIN_NUMEL:
            if weights == "int8" and v.dim() >= 2:
                scale = v.abs().amax(dim=tuple(range(1, v.dim())), keepdim=True).float().clamp_min(1e-12) / 127
                out[k] = (v.float() / scale).round().clamp(-127, 127).to(torch.int8)
                scales[k] = scale
                continue
            v = v.to(torch.float16)
        out[k] = v.contiguous()
    return out, scales


def pack(checkpoint: Path | str, name: str, info: dict, folder: Path | None = None,
         face_frame: str | None = None, head_bias=None, mirror_average: bool | None = None,
         weights: str = "float16") -> Path:
    """Write the selected weights of a run (or checkpoint file) as bundled model ``name`` with card ``info``.

    ``face_frame`` overrides the checkpoint's: the frame describes the training crops and may be
    set on a run after its best checkpoint was written (it is resume-free). ``head_bias`` (one
    value per class) is added to the classifier's output bias, e.g. :func:`adjustment_bias`, so
    predict, evaluate and the ONNX export all apply it. ``mirror_average`` sets
    ``model.mirror_average`` (logits averaged with the mirror image's at inference). ``weights``
    is how the large weight tensors are stored (:func:`storage_state`): float16 halves the package,
    int8 quarters it."""
    import torch

    from semifer.config import to_dict
    from semifer.engine.checkpoint import atomic_save
    from semifer.eval.report import load_model
    from semifer.labels import ABAW_LABELS

    model, cfg, ck = load_model(checkpoint, "cpu")
    if face_frame is not None:
        cfg.data.face_frame = face_frame
    if mirror_average is not None:
        cfg.model.mirror_average = bool(mirror_average)
    if head_bias is not None:
        with torch.no_grad():
            model.head.bias += torch.as_tensor(head_bias, dtype=model.head.bias.dtype)
    out = (folder or BUNDLED_DIR) / f"{name}.pt"
    state, scales = storage_state(model.state_dict(), weights)
    atomic_save({"model": state, **({"weight_scales": scales} if scales else {}), "config": to_dict(cfg),
                 "labels": list(ABAW_LABELS), "step": ck.get("step"), "card": dict(info)}, out)
    return out
