"""Fine-tuning controls: stage freezing, BatchNorm freezing, layer-wise LR decay, head LR, exact resume."""
from __future__ import annotations

import pytest
import torch

import semifer
from semifer.config import OptimConfig
from semifer.engine.checkpoint import load_checkpoint
from semifer.engine.trainer import make_optimizer
from semifer.models import Classifier
from semifer.models.finetune import stage_module_names
from tests.conftest import tiny_config


def _ir18(**kw) -> Classifier:
    return Classifier("ir18", 8, width=4, pool="avg", **kw)


def test_stages_declared_and_derived():
    assert stage_module_names(_ir18().backbone)[1:5] == [["layer1"], ["layer2"], ["layer3"], ["layer4"]]
    # small_cnn declares nothing: leaf runs / containers become stages, parameter-free modules are skipped.
    derived = stage_module_names(Classifier("small_cnn", 8, width=4).backbone)
    assert derived == [[str(i)] for i in (0, 1, 3, 4, 6, 7, 9, 10)]


def test_freeze_stages_and_bn():
    model = _ir18()
    model.freeze(stages=2)
    bb = model.backbone
    assert not bb.conv1.weight.requires_grad and not bb.layer1[0].conv2.weight.requires_grad
    assert bb.layer2[0].conv1.weight.requires_grad and model.head.weight.requires_grad
    model.train()
    assert not bb.layer1[0].bn1.training and bb.layer2[0].bn1.training   # frozen stages keep their statistics

    model = _ir18()
    model.freeze(bn=True)
    model.train()
    before = model.backbone.layer3[0].bn2.running_mean.clone()
    model(torch.rand(4, 3, 32, 32)).sum().backward()
    assert torch.equal(before, model.backbone.layer3[0].bn2.running_mean)
    assert model.backbone.layer3[0].bn2.weight.grad is None and model.backbone.layer3[0].conv1.weight.grad is not None

    model = _ir18()
    model.freeze(stages=-1)
    assert not any(p.requires_grad for p in model.backbone.parameters()) and model.head.weight.requires_grad
    with pytest.raises(ValueError, match="freeze_stages=9"):
        _ir18().freeze(stages=9)


def test_default_optimizer_groups_are_unchanged():
    opt = make_optimizer(OptimConfig(), _ir18())
    assert len(opt.param_groups) == 2 and "lr_scale" not in opt.param_groups[0]


def test_layer_decay_and_head_lr_groups():
    model = _ir18()
    model.freeze(stages=1)
    opt = make_optimizer(OptimConfig(lr=0.1, layer_decay=0.5, head_lr=0.3), model)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(scale) == len(trainable) == sum(len(g["params"]) for g in opt.param_groups)  # each once
    bb = model.backbone
    assert id(bb.conv1.weight) not in scale                       # frozen: left out
    assert scale[id(model.head.weight)] == pytest.approx(3.0)      # head_lr / lr
    # 6 stages (stem, layer1-4, neck): layer4 is stage 4 -> 0.5 ** 2; layer1 -> 0.5 ** 5.
    assert scale[id(bb.layer4[0].conv1.weight)] == pytest.approx(0.25)
    assert scale[id(bb.layer1[0].conv1.weight)] == pytest.approx(0.5 ** 5)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(bb.layer4[0].bn1.weight) in no_decay and id(bb.layer4[0].conv1.weight) not in no_decay


def test_finetuning_run_resumes_exactly(tiny_data, tmp_path):
    kw = dict(algorithm="supervised", steps=6, run={"checkpoint_every": 3, "eval_every": 3},
              model={"backbone": "ir18", "backbone_args": {"width": 4, "pool": "avg"}, "freeze_stages": 1,
                     "freeze_bn": True},
              optim={"layer_decay": 0.7, "head_lr": 0.1, "batch_size": 16, "lr": 0.05})
    semifer.train(tiny_config(tiny_data, tmp_path / "full", **kw))
    part = tiny_config(tiny_data, tmp_path / "part", **kw)
    semifer.train(part, stop_after=3)
    semifer.train(part)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    groups = a["optimizer"]["param_groups"]
    assert {round(g["lr_scale"], 6) for g in groups} >= {2.0, 0.49}   # head, layer4 (the neck is all BN: frozen)
