"""``semifer export CHECKPOINT --onnx OUT.onnx`` and the onnxruntime classifier that reads it.

The exported graph takes the same input as the torch model, float32 images in [0, 1] of
shape (batch, C, S, S) with a dynamic batch, and returns ``logits`` and ``probs``. The
input size, channels and label order ride along as ONNX metadata (``semifer.*``).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from semifer.labels import ABAW_LABELS


class _WithProbs(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return logits, torch.softmax(logits, dim=1)


def export_onnx(checkpoint: Path | str, out: Path | str, opset: int = 18) -> Path:
    """Export a run directory's best checkpoint (or a checkpoint file) to ``out``; returns ``out``."""
    import onnx

    from semifer.eval.report import load_model, resolve_checkpoint

    model, cfg, ckpt = load_model(checkpoint, "cpu")
    size, chans = cfg.data.image_size, cfg.data.channels
    wrapped = _WithProbs(model).eval()
    example = torch.rand(2, chans, size, size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    names = {"input_names": ["images"], "output_names": ["logits", "probs"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter about deprecations, not about this model
        # The torch.export-based exporter is current; the TorchScript one (deprecated) is the
        # fallback for models torch.export cannot trace.
        try:
            prog = torch.onnx.export(wrapped, (example,), dynamo=True, opset_version=opset, verbose=False,
                                     dynamic_shapes=({0: torch.export.Dim("batch")},), **names)
            prog.save(str(tmp), external_data=False)
        except Exception:  # noqa: BLE001 - retried with the other exporter
            torch.onnx.export(wrapped, (example,), str(tmp), dynamo=False, opset_version=min(opset, 17),
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}, "probs": {0: "batch"}},
                              **names)
    proto = onnx.load(str(tmp))
    meta = {"semifer.image_size": str(size), "semifer.channels": str(chans),
            "semifer.labels": json.dumps(list(ABAW_LABELS)), "semifer.step": str(ckpt.get("step")),
            "semifer.checkpoint": str(resolve_checkpoint(checkpoint)), "semifer.backbone": cfg.model.backbone,
            "semifer.face_frame": cfg.data.face_frame}
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))
    os.replace(tmp, out)
    return out


class OnnxClassifier:
    """An exported classifier run by onnxruntime: ``(N, C, S, S)`` float [0, 1] -> probs (N, 8)."""

    def __init__(self, path: Path | str, threads: int = 0) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError("ONNX models need onnxruntime: pip install onnxruntime") from None
        if not Path(path).is_file():
            raise FileNotFoundError(f"no ONNX model at {path}")
        self.path = Path(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        labels = json.loads(meta.get("semifer.labels", json.dumps(list(ABAW_LABELS))))
        if labels != list(ABAW_LABELS):
            raise ValueError(f"{path}: label order {labels} is not ABAW's")
        shape = self.session.get_inputs()[0].shape
        self.channels = int(meta.get("semifer.channels", shape[1]))
        self.image_size = int(meta.get("semifer.image_size", shape[2]))
        # files exported before face frames existed were all trained on ArcFace-aligned crops
        self.face_frame = meta.get("semifer.face_frame", "arcface112")
        self.input_name = self.session.get_inputs()[0].name
        outs = [o.name for o in self.session.get_outputs()]
        self._probs = "probs" in outs
        self._out = "probs" if self._probs else outs[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = self.session.run([self._out], {self.input_name: np.ascontiguousarray(x, np.float32)})[0]
        if self._probs:
            return y
        e = np.exp(y - y.max(1, keepdims=True))  # a plain logits model
        return e / e.sum(1, keepdims=True)


class TorchClassifier:
    """A checkpoint (run dir or file, loaded with ``weights_only=True``): same call as OnnxClassifier."""

    def __init__(self, path: Path | str, device: str = "cpu") -> None:
        from semifer.eval.report import load_model

        from semifer.eval.report import resolve_checkpoint

        self.path = resolve_checkpoint(path)
        self.model, cfg, _ = load_model(path, device)
        # channels-last convolutions: about 27 % less time per face for the bundled CNNs on this
        # project's CPU (docs/inference.md); the weights and the outputs are unchanged
        self.model = self.model.to(memory_format=torch.channels_last)
        self.device = torch.device(device)
        self.image_size, self.channels, self.face_frame = cfg.data.image_size, cfg.data.channels, cfg.data.face_frame

    @torch.inference_mode()
    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(self.device)
        logits = self.model(x.contiguous(memory_format=torch.channels_last))
        return torch.softmax(logits.float(), 1).cpu().numpy()


def load_classifier(path: Path | str, device: str = "cpu"):
    """OnnxClassifier for a ``.onnx`` file, TorchClassifier for a run directory or checkpoint."""
    return OnnxClassifier(path) if str(path).lower().endswith(".onnx") else TorchClassifier(path, device)
