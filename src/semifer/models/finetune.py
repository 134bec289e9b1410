"""Fine-tuning controls: backbone stages, stage freezing, BatchNorm freezing, layer-wise LR decay.

A backbone's *stages* run from the input: stage 0 is the stem, then the residual
stages, then any neck (embedding layers). A backbone declares them as
``module.stages = [[child names], ...]``; otherwise they are derived from its
top-level children: consecutive leaf modules (conv, BN, activation, pooling) are
merged into one stage and every container (Sequential, ModuleList, block) is a stage.
Parameters owned directly by the backbone (e.g. a ViT's position embedding) join stage 0.
"""
from __future__ import annotations

from torch import nn

NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def stage_module_names(backbone: nn.Module) -> list[list[str]]:
    """Names (relative to ``backbone``) of the modules in each stage, input side first."""
    declared = getattr(backbone, "stages", None)
    if declared:
        return [list(s) for s in declared]
    stages: list[list[str]] = []
    leaf_run: list[str] = []
    for name, child in backbone.named_children():
        if not any(True for _ in child.parameters()) and not any(True for _ in child.buffers()):
            continue  # parameter-free (activation, pooling, identity): nothing to freeze or decay
        if len(list(child.children())) == 0:
            leaf_run.append(name)
            continue
        if leaf_run:
            stages.append(leaf_run)
            leaf_run = []
        stages.append([name])
    if leaf_run:
        stages.append(leaf_run)
    return stages


def stage_parameters(backbone: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
    """Each stage's (name, parameter) pairs; every backbone parameter appears exactly once."""
    stages = stage_module_names(backbone)
    owner: dict[str, int] = {}
    for i, names in enumerate(stages):
        for n in names:
            owner[n] = i
    out: list[list[tuple[str, nn.Parameter]]] = [[] for _ in stages] or [[]]
    for pname, p in backbone.named_parameters():
        parts = pname.split(".")
        idx = 0  # parameters outside every declared stage belong to the stem
        for k in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:k])
            if prefix in owner:
                idx = owner[prefix]
                break
        out[idx].append((pname, p))
    return out


def freeze(backbone: nn.Module, stages: int, bn: bool) -> list[str]:
    """Stop training the first ``stages`` stages (-1: the whole backbone) and, with ``bn``, every
    BatchNorm. Returns the names of the norm modules to keep in eval mode (running statistics
    fixed): those of frozen stages, and all of them with ``bn``."""
    names = stage_module_names(backbone)
    n = len(names) if stages < 0 else min(stages, len(names))
    if stages > len(names):
        raise ValueError(f"model.freeze_stages={stages} but the backbone has {len(names)} stages")
    frozen_prefixes = [m for s in names[:n] for m in s]
    if stages < 0:
        backbone.requires_grad_(False)
    else:
        for stage in stage_parameters(backbone)[:n]:
            for _, p in stage:
                p.requires_grad_(False)
    eval_norms = []
    for mname, m in backbone.named_modules():
        if not isinstance(m, NORM_TYPES):
            continue
        in_frozen = any(mname == f or mname.startswith(f + ".") for f in frozen_prefixes)
        if stages < 0 or bn or in_frozen:
            eval_norms.append(mname)
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
    return eval_norms


def layerwise_param_groups(model: nn.Module, weight_decay: float, lr: float, layer_decay: float = 1.0,
                           head_lr: float = 0.0) -> list[dict]:
    """Optimizer groups with an ``lr_scale`` each (the trainer multiplies the scheduled LR by it).

    Backbone stage i of K gets ``layer_decay ** (K - i)``, the head ``head_lr / lr`` (1 when
    ``head_lr`` is 0); biases and norm parameters (ndim <= 1) get no weight decay. Frozen
    parameters are left out. The grouping depends only on the model and these numbers, so a
    resumed run rebuilds the same groups and its optimizer state loads.
    """
    backbone = getattr(model, "backbone", None)
    stages = stage_parameters(backbone) if backbone is not None else []
    in_stages = {id(p) for s in stages for _, p in s}
    head = [p for p in model.parameters() if id(p) not in in_stages]
    k = len(stages)
    scaled = [(head_lr / lr if head_lr > 0 else 1.0, head)]
    scaled += [(layer_decay ** (k - i), [p for _, p in s]) for i, s in reversed(list(enumerate(stages)))]
    groups = []
    for scale, params in scaled:
        params = [p for p in params if p.requires_grad]
        for decay, chosen in ((weight_decay, [p for p in params if p.ndim > 1]),
                              (0.0, [p for p in params if p.ndim <= 1])):
            if chosen:
                groups.append({"params": chosen, "weight_decay": decay, "lr_scale": scale})
    return groups
