"""Optimizer and learning-rate schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from semifer.config import OptimConfig


def make_optimizer(cfg: OptimConfig, model: nn.Module, fused: bool = False) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW; no weight decay on biases and normalisation parameters.

    ``fused``: one fused kernel per parameter group (the trainer sets it on CUDA only, so CPU
    numerics are unchanged); it changes no optimizer state, see :func:`set_fused`.

    With ``layer_decay`` or ``head_lr`` set, one group per backbone stage and the head, each
    with an ``lr_scale`` (semifer.models.finetune); otherwise the two groups of old, so old
    checkpoints' optimizer states still load.
    """
    if cfg.layer_decay != 1.0 or cfg.head_lr > 0:
        from semifer.models.finetune import layerwise_param_groups
        groups = layerwise_param_groups(model, cfg.weight_decay, cfg.lr, cfg.layer_decay, cfg.head_lr)
    else:
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if fused else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **kw)
    return torch.optim.AdamW(groups, lr=cfg.lr, **kw)


def set_fused(opt: torch.optim.Optimizer, fused: bool) -> None:
    """Pick the fused or the default implementation after ``load_state_dict``.

    A loaded state dict brings the saved run's ``fused``/``foreach`` flags along; the state
    itself (momentum buffers, Adam moments) is the same for both, so a checkpoint written on
    CUDA (fused) resumes on a CPU (default implementation) and the other way round.
    """
    for g in opt.param_groups:
        g["fused"] = True if fused else None
        if fused:
            g["foreach"] = None


def lr_at(cfg: OptimConfig, step: int) -> float:
    """Learning rate at ``step``: linear warm-up, then constant or FixMatch's cosine (7/16 of a period)."""
    if step < cfg.lr_warmup_steps:
        return cfg.lr * (step + 1) / cfg.lr_warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    return cfg.lr * math.cos(7 * math.pi * step / (16 * max(cfg.steps, 1)))
