"""Load pretrained backbone weights from local files (``model.pretrained`` / ``--pretrained``).

Accepted: insightface ``arcface_torch`` ``backbone.pth`` (iresnet keys), face.evoLVe
``backbone_ir50_*.pth`` (``input_layer``/``body``/``output_layer``), torchvision and timm
state dicts (``.pth``/``.pt``/``.bin``; ``.safetensors`` when safetensors is installed),
semifer checkpoints (their ``backbone.*`` weights), and dlib's face-recognition network
(``.dat``, or ``dlib-fr`` for the copy in the ``face_recognition_models`` package).
Tensor files are read with ``torch.load(weights_only=True)``: nothing is unpickled.
Nothing is downloaded. The classifier head is never loaded (it is created fresh).

Matching is by parameter name after removing wrapper prefixes (``module.``, ``backbone.``,
``model.``, ``_orig_mod.``). A shape mismatch, a backbone weight the file lacks, or a file
weight the backbone has no place for is an architecture mismatch and an error; the
backbone's ``pretrained_ignore`` prefixes (classification layers it removed) are dropped
and reported. An RGB stem loads into a 1-channel (grayscale) stem by summing its
kernels over the colour axis: the same as feeding the gray image repeated 3 times.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

WRAPPER_KEYS = ("state_dict", "model", "module", "backbone", "net", "params")
PREFIXES = ("module.", "_orig_mod.", "backbone.", "model.", "encoder.")


class PretrainedMismatch(ValueError):
    """The weights file does not fit the configured backbone."""


@dataclass
class LoadReport:
    source: str
    layout: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)   # "key: file shape vs model shape"

    def summary(self) -> str:
        parts = [f"loaded {self.loaded} tensors from {self.source} ({self.layout})"]
        for label, keys in (("shape mismatch", self.mismatched), ("missing", self.missing),
                            ("unexpected", self.unexpected),
                            ("ignored head", self.ignored), ("RGB stem summed to 1 channel", self.converted)):
            if keys:
                parts.append(f"{label}: {_short(keys)}")
        return "; ".join(parts)

    def as_dict(self) -> dict:
        return {"source": self.source, "layout": self.layout, "loaded": self.loaded, "missing": self.missing,
                "unexpected": self.unexpected, "ignored": self.ignored, "converted": self.converted,
                "mismatched": self.mismatched}


def _short(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def detect_layout(keys: list[str] | set[str]) -> str:
    """Name the checkpoint family from its parameter names (for messages and reports)."""
    k = set(keys)
    if "input_layer.0.weight" in k and any(x.startswith("body.") for x in k):
        return "face.evoLVe IR"
    if "prelu.weight" in k and "layer1.0.bn1.weight" in k:
        return "insightface iresnet"
    if "conv_6_sep.conv.weight" in k:
        return "MobileFaceNet"
    if "conv1.weight" in k and "layer1.0.conv1.weight" in k and "bn1.running_mean" in k:
        return "torchvision/timm ResNet"
    return "state dict"


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The tensor mapping inside a checkpoint (plain state dict, {'state_dict': ...}, semifer checkpoint)."""
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        if isinstance(obj, dict):
            inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is not None:
                obj = inner
                continue
        raise PretrainedMismatch(f"{path}: no state dict of tensors found (top-level keys: "
                                 f"{_short(sorted(map(str, obj)) if isinstance(obj, dict) else [type(obj).__name__])})")
    state = dict(obj)  # type: ignore[arg-type]
    if any(k.startswith("backbone.") for k in state) and any(k.startswith("head.") for k in state):
        # A semifer checkpoint (Classifier): its backbone only; the head is created fresh.
        state = {k: v for k, v in state.items() if k.startswith("backbone.")}
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if state and all(k.startswith(p) for k in state):
                state = {k[len(p):]: v for k, v in state.items()}
                changed = True
    return state


def read_weights(spec: str) -> tuple[dict[str, torch.Tensor], str, str]:
    """(state dict, layout name, resolved source) for a ``model.pretrained`` value."""
    if spec == "dlib-fr" or spec.endswith(".dat"):
        from semifer.models.dlib_resnet import dlib_fr_model_path, dlib_state_dict

        path = dlib_fr_model_path() if spec == "dlib-fr" else Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"no pretrained weights at {path}")
        return dlib_state_dict(path), "dlib face recognition ResNet", str(path)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"no pretrained weights at {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"{path}: reading .safetensors needs the safetensors package") from None
        state = _unwrap(load_file(str(path)), path)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise PretrainedMismatch(f"{path} is not a readable weights file (torch.load weights_only=True): "
                                     f"{e}") from e
        state = _unwrap(obj, path)
    return state, detect_layout(state), str(path)


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def load_pretrained(backbone: nn.Module, spec: str, strict: bool = True, backbone_name: str = "") -> LoadReport:
    """Copy the weights named by ``spec`` into ``backbone``; see the module docstring for the rules.

    ``strict=False`` loads the weights whose names and shapes match and only reports the rest.
    """
    state, layout, source = read_weights(spec)
    report = LoadReport(source, layout)
    own = backbone.state_dict()
    ignore = tuple(getattr(backbone, "pretrained_ignore", ()))
    what = f"backbone {backbone_name}" if backbone_name else "the backbone"
    to_load: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in own:
            if ignore and key.startswith(ignore):
                report.ignored.append(key)
            elif not _is_counter(key):
                report.unexpected.append(key)
            continue
        target = own[key]
        if value.shape != target.shape:
            if (value.ndim == 4 and target.ndim == 4 and value.shape[1] == 3 and target.shape[1] == 1
                    and value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:]):
                value = value.sum(1, keepdim=True)   # RGB stem -> gray stem (gray repeated 3 times)
                report.converted.append(key)
            else:
                report.mismatched.append(f"{key}: file {tuple(value.shape)} vs model {tuple(target.shape)}")
                continue
        to_load[key] = value.to(dtype=target.dtype) if target.is_floating_point() else value
    bad_shape = {e.split(":")[0] for e in report.mismatched}
    report.missing = [k for k in own if k not in to_load and not _is_counter(k) and k not in bad_shape]
    report.loaded = len(to_load)
    if strict and (report.mismatched or report.missing or report.unexpected):
        lines = [f"{source} ({layout}) does not fit {what}:"]
        if report.mismatched:
            lines.append(f"  shape mismatches: {_short(report.mismatched)}")
        if report.missing:
            lines.append(f"  weights the file lacks: {_short(report.missing)}")
        if report.unexpected:
            lines.append(f"  file weights the backbone has no place for: {_short(report.unexpected)}")
        if not to_load:
            lines.append("  no parameter name in common: is this the right backbone (semifer backbones)?")
        lines.append("  set model.pretrained_strict: false to load only the matching weights")
        raise PretrainedMismatch("\n".join(lines))
    if not to_load:
        raise PretrainedMismatch(f"{source} ({layout}): no weight fits {what}")
    backbone.load_state_dict(to_load, strict=False)
    return report
