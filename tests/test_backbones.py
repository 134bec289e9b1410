"""Backbone registry: every architecture builds tiny, runs, and keeps the key names its checkpoints use."""
from __future__ import annotations

import pytest
import torch

import semifer  # noqa: F401  (registers backbones)
from semifer.models import Classifier
from semifer.models.backbones import describe_backbones
from semifer.registry import BACKBONES

TINY = {
    "small_cnn": ({"width": 4}, 24),
    "ir18": ({"width": 4, "input_size": 32, "num_features": 16}, 32),
    "ir34": ({"width": 4, "pool": "avg"}, 24),
    "ir50_evolve": ({"width": 4, "input_size": 32, "num_features": 16}, 32),
    "mobilefacenet": ({"width": 8, "input_size": 32, "embedding": 16}, 32),
    "dlib_resnet34": ({"width": 4, "padding": "same"}, 48),
    "tv:resnet18": ({"small_input": True}, 24),
    "tv:mobilenet_v3_small": ({}, 32),
}


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("in_chans", [1, 3])
def test_backbone_builds_and_runs(name, in_chans):
    args, size = TINY[name]
    model = Classifier(name, 8, in_chans=in_chans, **args).eval()
    out = model(torch.rand(2, in_chans, size, size))
    assert out.shape == (2, 8) and torch.isfinite(out).all()
    assert model.mean.shape == (1, in_chans, 1, 1)


def test_registry_lists_families_and_counts():
    rows = {name: (n, doc) for name, n, doc in describe_backbones()}
    for name in ("ir18", "ir34", "ir50", "ir100", "ir50_evolve", "mobilefacenet", "dlib_resnet34", "small_cnn"):
        assert rows[name][0] > 0 and rows[name][1]
    # Published sizes: IR-50 43.6M, IR-100 65.2M, MobileFaceNet ~1.0M (their embeddings included).
    assert abs(rows["ir50"][0] / 1e6 - 43.59) < 0.05 and abs(rows["ir100"][0] / 1e6 - 65.16) < 0.05
    assert 0.95e6 < rows["mobilefacenet"][0] < 1.05e6
    assert rows["tv:NAME"][0] is None and "timm:NAME" in rows
    assert rows["ensemble"][0] is None and rows["ensemble"][1]      # needs its members: listed, not counted
    assert "tv:resnet34" in BACKBONES and "nope:resnet34" not in BACKBONES
    with pytest.raises(KeyError, match="tv:NAME"):
        BACKBONES.get("no_such_backbone")


def test_insightface_key_names():
    net, dim = BACKBONES.get("ir18")(width=4, input_size=32, num_features=16)
    keys = set(net.state_dict())
    for k in ("conv1.weight", "bn1.running_mean", "prelu.weight", "layer1.0.bn1.weight", "layer1.0.conv1.weight",
              "layer1.0.bn2.weight", "layer1.0.prelu.weight", "layer1.0.conv2.weight", "layer1.0.bn3.bias",
              "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_var", "layer4.1.bn3.weight",
              "bn2.weight", "fc.weight", "fc.bias", "features.weight", "features.running_mean"):
        assert k in keys, k
    assert "layer1.2.bn1.weight" not in keys and dim == 16
    assert not net.features.weight.requires_grad   # fixed-scale BN, as in arcface_torch


def test_evolve_key_names():
    net, _ = BACKBONES.get("ir50_evolve")(width=4, input_size=32, num_features=16)
    keys = set(net.state_dict())
    for k in ("input_layer.0.weight", "input_layer.1.running_mean", "input_layer.2.weight",
              "body.0.res_layer.0.weight", "body.0.res_layer.1.weight", "body.0.res_layer.2.weight",
              "body.0.res_layer.3.weight", "body.0.res_layer.4.running_var", "body.3.shortcut_layer.0.weight",
              "body.3.shortcut_layer.1.weight", "body.23.res_layer.3.weight", "output_layer.0.weight",
              "output_layer.3.weight", "output_layer.4.running_mean"):
        assert k in keys, k
    # Stage 1 keeps its width: a parameter-free max-pool shortcut; 24 units in IR-50.
    assert not any(k.startswith("body.0.shortcut_layer") for k in keys) and "body.24.res_layer.1.weight" not in keys


def test_mobilefacenet_key_names():
    net, _ = BACKBONES.get("mobilefacenet")()
    keys = set(net.state_dict())
    for k in ("conv1.conv.weight", "conv1.prelu.weight", "conv2_dw.conv.weight", "conv_23.conv.conv.weight",
              "conv_23.conv_dw.bn.running_mean", "conv_23.project.conv.weight", "conv_3.model.3.project.bn.weight",
              "conv_4.model.5.conv.conv.weight", "conv_5.model.1.conv_dw.conv.weight", "conv_6_sep.conv.weight",
              "conv_6_dw.conv.weight", "conv_6_dw.bn.weight", "linear.weight", "bn.running_var"):
        assert k in keys, k
    assert "conv_6_dw.prelu.weight" not in keys and "conv_23.project.prelu.weight" not in keys


def test_flatten_pool_needs_its_input_size():
    model = Classifier("ir18", 8, width=4, input_size=32, num_features=16)
    with pytest.raises(ValueError, match="pool: avg"):
        model(torch.rand(2, 3, 48, 48))


def test_backbone_normalisation_comes_from_the_backbone():
    dlib = Classifier("dlib_resnet34", 8, width=4)
    assert torch.allclose(dlib.mean.flatten(), torch.tensor([122.782, 117.001, 104.298]) / 255)
    assert torch.allclose(dlib.std.flatten(), torch.full((3,), 256 / 255))
    gray = Classifier("ir18", 8, in_chans=1, width=4, pool="avg")
    assert gray.mean.flatten().tolist() == [0.5] and gray.std.flatten().tolist() == [0.5]
    # Backbones without statistics keep the classifier's defaults (unchanged behaviour).
    assert Classifier("small_cnn", 8, width=4).std.flatten().tolist() == [0.25] * 3


def test_timm_family():
    pytest.importorskip("timm")
    model = Classifier("timm:resnet18", 8, in_chans=1).eval()
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 8)
    with pytest.raises(KeyError, match="timm:not_a_model"):
        Classifier("timm:not_a_model", 8)


def test_unknown_torchvision_model_is_a_clear_error():
    with pytest.raises(KeyError, match="tv:resnet_nope"):
        Classifier("tv:resnet_nope", 8)
