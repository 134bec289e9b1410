"""Several trained classifiers as one model: the ``ensemble`` backbone and :func:`combine`.

The ensemble is an ordinary :class:`~semifer.models.classifier.Classifier` whose backbone runs
its members side by side on the same input and concatenates their features. Its linear head
holds the members' heads scaled by their weights, so its logits are the weighted mean of the
members' logits:

    z = sum_k w_k (W_k f_k(x) + b_k) = [w_1 W_1 ... w_K W_K] [f_1(x); ...; f_K(x)] + sum_k w_k b_k

Because it is one ``nn.Module`` with one config, checkpoints, ``predict``, ``evaluate``, mirror
averaging and the ONNX export need nothing new.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from semifer.registry import BACKBONES


class EnsembleFeatures(nn.Module):
    """Member backbones on the same input; their features concatenated in member order."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.members], 1)


@BACKBONES.register("ensemble")
def ensemble(in_chans: int = 3, members: Sequence[dict[str, Any]] = ()) -> tuple[nn.Module, int]:
    """Member backbones side by side (``members``: ``[{backbone: NAME, backbone_args: {...}}, ...]``)."""
    if not members:
        raise ValueError("the ensemble backbone needs members: [{backbone: NAME, backbone_args: {...}}, ...]")
    mods, dim = [], 0
    for spec in members:
        unknown = set(spec) - {"backbone", "backbone_args"}
        if "backbone" not in spec or unknown:
            raise ValueError(f"ensemble member {spec!r}: give backbone (and optionally backbone_args) only")
        if spec["backbone"] == "ensemble":
            raise ValueError("an ensemble member cannot itself be an ensemble")
        m, d = BACKBONES.get(spec["backbone"])(in_chans=in_chans, **dict(spec.get("backbone_args") or {}))
        mods.append(m)
        dim += d
    return EnsembleFeatures(mods), dim


def combine(models: Sequence[nn.Module], specs: Sequence[dict[str, Any]],
            weights: Sequence[float] | None = None) -> tuple[dict, dict]:
    """(backbone_args, state_dict) of the ensemble of trained ``Classifier`` s ``models``.

    ``specs[k]`` is model k's ``{backbone, backbone_args}``; ``weights`` (default: equal) are
    normalised to sum to 1. Every member must take the same input (channels and normalisation)
    and predict the same classes.
    """
    if len(specs) != len(models):
        raise ValueError("one {backbone, backbone_args} spec per model")
    if len(models) < 2:
        raise ValueError("an ensemble needs at least two models")
    w = torch.tensor([1.0] * len(models) if weights is None else [float(v) for v in weights])
    if len(w) != len(models) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"one non-negative weight per model, not all zero; got {list(map(float, w))}")
    w = w / w.sum()
    first = models[0]
    for m in models[1:]:
        if m.head.out_features != first.head.out_features:
            raise ValueError("ensemble members predict different numbers of classes")
        if not (torch.equal(m.mean, first.mean) and torch.equal(m.std, first.std)):
            raise ValueError("ensemble members normalise their input differently")
    sd: dict[str, torch.Tensor] = {}
    for k, m in enumerate(models):
        for name, t in m.backbone.state_dict().items():
            sd[f"backbone.members.{k}.{name}"] = t.clone()
    with torch.no_grad():
        sd["head.weight"] = torch.cat([wk * m.head.weight for wk, m in zip(w, models)], 1).contiguous()
        sd["head.bias"] = sum(wk * m.head.bias for wk, m in zip(w, models)).contiguous()
    members = [{"backbone": s["backbone"], "backbone_args": dict(s.get("backbone_args") or {})} for s in specs]
    return {"members": members}, sd


__all__ = ["EnsembleFeatures", "ensemble", "combine"]
