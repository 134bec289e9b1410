"""--pretrained: every supported key layout loads; mismatches are refused with a clear error."""
from __future__ import annotations

import pickle

import pytest
import torch

import semifer
from semifer.models import Classifier
from semifer.models.pretrained import PretrainedMismatch, detect_layout, load_pretrained
from semifer.registry import BACKBONES
from tests.conftest import tiny_config


def _randomise(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Distinct, non-default values everywhere (incl. BN statistics), so a load is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + (0.5 if "running_var" in name else -0.25))
    return net.eval()


def _same_output(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x), atol=1e-5)


@pytest.mark.parametrize("name, args, size, layout", [
    ("ir18", {"width": 4, "input_size": 32, "num_features": 16}, 32, "insightface iresnet"),
    ("ir50_evolve", {"width": 4, "input_size": 32, "num_features": 16}, 32, "face.evoLVe IR"),
    ("mobilefacenet", {"width": 8, "input_size": 32, "embedding": 16}, 32, "MobileFaceNet"),
])
def test_face_recognition_layouts_load(tmp_path, name, args, size, layout):
    src, _ = BACKBONES.get(name)(**args)
    _randomise(src, 1)
    path = tmp_path / "backbone.pth"
    torch.save(src.state_dict(), path)          # how arcface_torch / face.evoLVe save their backbones
    dst, _ = BACKBONES.get(name)(**args)
    x = torch.rand(2, 3, size, size)
    assert not _same_output(src, dst, x)
    report = load_pretrained(dst, str(path))
    assert report.layout == layout and not report.missing and not report.unexpected
    assert _same_output(src, dst, x)


def test_pooled_variant_drops_the_embedding_and_says_so(tmp_path):
    src, _ = BACKBONES.get("ir18")(width=4, input_size=32, num_features=16)
    torch.save(_randomise(src, 2).state_dict(), tmp_path / "backbone.pth")
    dst, dim = BACKBONES.get("ir18")(width=4, pool="avg")
    report = load_pretrained(dst, str(tmp_path / "backbone.pth"))
    assert dim == 32 and "fc.weight" in report.ignored and "features.running_mean" in report.ignored
    assert torch.equal(dst.layer4[1].conv2.weight, src.layer4[1].conv2.weight)


def test_torchvision_state_dict_wrapped_and_prefixed(tmp_path):
    import torchvision

    full = _randomise(torchvision.models.resnet18(weights=None), 3)
    # A training-script checkpoint: {'state_dict': {'module.<key>': tensor}} (DDP prefix).
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in full.state_dict().items()}},
               tmp_path / "r18.pth")
    model = Classifier("tv:resnet18", 8)
    report = load_pretrained(model.backbone, str(tmp_path / "r18.pth"), backbone_name="tv:resnet18")
    assert report.ignored == ["fc.weight", "fc.bias"] and not report.missing
    full.fc = torch.nn.Identity()
    assert _same_output(full, model.backbone, torch.rand(2, 3, 64, 64))


def test_rgb_stem_loads_into_grayscale_stem(tmp_path):
    import torchvision

    rgb = _randomise(torchvision.models.resnet18(weights=None), 4)
    torch.save(rgb.state_dict(), tmp_path / "r18.pth")
    gray = Classifier("tv:resnet18", 8, in_chans=1)
    report = load_pretrained(gray.backbone, str(tmp_path / "r18.pth"))
    assert report.converted == ["conv1.weight"]
    rgb.fc = torch.nn.Identity()
    g = torch.rand(2, 1, 64, 64)
    # Summed kernels on the gray image == RGB kernels on the gray image repeated 3 times.
    with torch.no_grad():
        assert torch.allclose(gray.backbone.eval()(g), rgb(g.repeat(1, 3, 1, 1)), atol=1e-4)


def test_timm_state_dict(tmp_path):
    timm = pytest.importorskip("timm")
    full = _randomise(timm.create_model("resnet18", pretrained=False, num_classes=10), 5)
    torch.save(full.state_dict(), tmp_path / "timm_r18.pth")
    model = Classifier("timm:resnet18", 8)
    report = load_pretrained(model.backbone, str(tmp_path / "timm_r18.pth"))
    assert set(report.ignored) == {"fc.weight", "fc.bias"} and not report.missing
    full.reset_classifier(0)
    assert _same_output(full, model.backbone, torch.rand(2, 3, 64, 64))


def test_safetensors_file(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    src, _ = BACKBONES.get("small_cnn")(width=4)
    st.save_file(_randomise(src, 6).state_dict(), str(tmp_path / "w.safetensors"))
    dst, _ = BACKBONES.get("small_cnn")(width=4)
    load_pretrained(dst, str(tmp_path / "w.safetensors"))
    assert _same_output(src, dst, torch.rand(2, 3, 24, 24))


def test_architecture_mismatch_is_refused(tmp_path):
    src, _ = BACKBONES.get("ir18")(width=4, input_size=32, num_features=16)
    torch.save(src.state_dict(), tmp_path / "ir18.pth")
    deeper, _ = BACKBONES.get("ir34")(width=4, input_size=32, num_features=16)
    with pytest.raises(PretrainedMismatch, match="weights the file lacks: .*layer1.2"):
        load_pretrained(deeper, str(tmp_path / "ir18.pth"), backbone_name="ir34")
    wider, _ = BACKBONES.get("ir18")(width=8, input_size=32, num_features=16)
    with pytest.raises(PretrainedMismatch, match=r"shape mismatches: conv1.weight: file \(4, 3, 3, 3\)"):
        load_pretrained(wider, str(tmp_path / "ir18.pth"))
    evolve, _ = BACKBONES.get("ir50_evolve")(width=4, input_size=32, num_features=16)
    with pytest.raises(PretrainedMismatch, match="(?s)insightface iresnet.*no parameter name in common"):
        load_pretrained(evolve, str(tmp_path / "ir18.pth"), backbone_name="ir50_evolve")
    # Non-strict: what matches is loaded, the rest reported.
    report = load_pretrained(deeper, str(tmp_path / "ir18.pth"), strict=False)
    assert report.loaded > 0 and any(k.startswith("layer1.2.") for k in report.missing)


@pytest.mark.badinput
def test_pickled_objects_are_never_loaded(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    net, _ = BACKBONES.get("small_cnn")(width=4)
    with pytest.raises(PretrainedMismatch, match="weights_only=True"):
        load_pretrained(net, str(path))
    with pytest.raises(FileNotFoundError):
        load_pretrained(net, str(tmp_path / "absent.pth"))


def test_detect_layout_names():
    assert detect_layout(["input_layer.0.weight", "body.0.res_layer.1.weight"]) == "face.evoLVe IR"
    assert detect_layout(["foo.weight"]) == "state dict"


def test_train_with_pretrained_semifer_checkpoint(tiny_data, tmp_path):
    """A semifer checkpoint's backbone seeds a new run (head fresh); the report lands in metrics.jsonl."""
    import json

    first = semifer.train(tiny_config(tiny_data, tmp_path / "a", algorithm="supervised", steps=2))
    ckpt = first.run_dir / "checkpoints" / "best.pt"
    cfg = tiny_config(tiny_data, tmp_path / "b", algorithm="supervised", steps=2,
                      model={"backbone": "small_cnn", "backbone_args": {"width": 8}, "pretrained": str(ckpt)})
    semifer.train(cfg)
    info = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[0])
    assert info["pretrained"]["loaded"] > 0 and not info["pretrained"]["missing"]
    bad = tiny_config(tiny_data, tmp_path / "c", algorithm="supervised", steps=2,
                      model={"backbone": "small_cnn", "backbone_args": {"width": 16}, "pretrained": str(ckpt)})
    with pytest.raises(PretrainedMismatch, match="shape mismatches"):
        semifer.train(bad)


def test_cli_pretrained_flag_sets_the_config():
    from semifer.cli import build_parser

    a = build_parser().parse_args(["train", "--pretrained", "dlib-fr"])
    assert a.pretrained == "dlib-fr"
