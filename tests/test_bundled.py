"""Bundled models: packing a run, listing, and every entry point using one without a path."""
from __future__ import annotations

import csv
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("dlib")
pytest.importorskip("skimage")

import semifer  # noqa: E402
import semifer.bundled as bundled  # noqa: E402
from semifer.cli import main  # noqa: E402
from semifer.labels import ABAW_LABELS  # noqa: E402
from tests.media_helpers import astronaut  # noqa: E402


@pytest.fixture()
def bundle_dir(tmp_path, monkeypatch, tiny_data):
    """A bundled-model folder holding one tiny packed model, in place of the package's."""
    from semifer.config import load_config, to_dict
    from semifer.engine.checkpoint import atomic_save
    from semifer.models import build_model

    cfg = load_config(base={"data": {"image_size": 24, "channels": 1, "face_frame": "fer2013", "test": tiny_data["val"]},
                            "model": {"backbone": "small_cnn", "backbone_args": {"width": 8}}})
    torch.manual_seed(0)
    model = build_model(cfg.model, len(ABAW_LABELS), in_chans=1)
    atomic_save({"model": model.state_dict(), "ema": model.state_dict(), "step": 5, "config": to_dict(cfg),
                 "labels": list(ABAW_LABELS)}, tmp_path / "run" / "checkpoints" / "best.pt")
    folder = tmp_path / "bundled"
    folder.mkdir()
    monkeypatch.setattr(bundled, "BUNDLED_DIR", folder)
    monkeypatch.setattr(bundled, "DEFAULT_MODEL", "tiny")
    cfg.data.face_frame = "arcface112"   # as a run started before its frame was set
    atomic_save({"model": model.state_dict(), "ema": model.state_dict(), "step": 5, "config": to_dict(cfg),
                 "labels": list(ABAW_LABELS)}, tmp_path / "run" / "checkpoints" / "best.pt")
    bundled.pack(tmp_path / "run", "tiny", {"trained_on": "stripes", "scored_on": "stripes val",
                                            "scores": {"accuracy": 0.5}}, folder, face_frame="fer2013")
    return folder


def test_pack_list_and_resolve(bundle_dir, tmp_path, capsys):
    assert list(bundled.available()) == ["tiny"]
    c = bundled.card()
    assert c["name"] == "tiny" and c["face_frame"] == "fer2013" and c["input"] == "24 px, 1 channel(s)"
    assert c["trained_on"] == "stripes" and c["step"] == 5
    assert bundled.resolve_model(None) == bundle_dir / "tiny.pt" == bundled.resolve_model("tiny")
    assert bundled.resolve_model(str(tmp_path / "run")) == tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="bundled: tiny"):
        bundled.resolve_model("nope")
    assert bundled.looks_like_model("tiny") and bundled.looks_like_model(str(tmp_path / "run"))
    assert not bundled.looks_like_model(str(tmp_path / "photo.jpg"))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "tiny (default)" in out and "face frame fer2013" in out and "accuracy 0.500" in out


def test_every_entry_point_uses_the_bundled_model(bundle_dir, tmp_path, tiny_data, capsys):
    photo = tmp_path / "astronaut.jpg"
    Image.fromarray(astronaut(512)).save(photo)
    r = semifer.Predictor().predict(str(photo))
    assert len(r) == 1 and r.probs.shape == (1, 8)
    assert main(["predict", str(photo), "--out", str(tmp_path / "p"), "--quiet"]) == 0   # no model argument
    with open(tmp_path / "p" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    np.testing.assert_allclose([float(rows[0][k]) for k in ABAW_LABELS], r.probs[0], atol=1e-5)
    capsys.readouterr()
    assert main(["predict", "--model", "tiny", str(photo), "--out", str(tmp_path / "q")]) == 0
    label = ABAW_LABELS[int(r.probs[0].argmax())]
    # A photo's answer on the console: one line per face, label and probability.
    assert f"astronaut.jpg face 0: {label} {r.probs[0].max():.2f}" in capsys.readouterr().out
    assert main(["evaluate", "--model", "tiny", "--data", tiny_data["val"]]) == 0
    pytest.importorskip("onnxscript")
    assert main(["export", "--model", "tiny", "--onnx", str(tmp_path / "tiny.onnx")]) == 0
    ro = semifer.Predictor(str(tmp_path / "tiny.onnx")).predict(str(photo))
    assert np.abs(ro.probs - r.probs).max() < 1e-4


def test_no_bundled_model_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bundled, "BUNDLED_DIR", tmp_path)
    photo = tmp_path / "a.jpg"
    Image.fromarray(astronaut(128)).save(photo)
    assert main(["predict", str(photo), "--out", str(tmp_path / "p")]) == 2
    assert "no bundled model" in capsys.readouterr().err


@pytest.mark.skipif(bundled.DEFAULT_MODEL not in bundled.available(), reason="the bundled model is not packed yet")
def test_the_shipped_model_predicts_the_astronaut_offline(monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("the bundled model touched the network")

    # connecting anywhere fails (replacing socket.socket itself breaks libraries that subclass it on import)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    from skimage import data

    r = semifer.Predictor().predict(data.astronaut())
    assert len(r) == 1
    np.testing.assert_allclose(r.probs.sum(1), 1.0, atol=1e-5)
    assert r.labels == ["Happiness"]  # she smiles


def test_prior_adjustment_picks_the_tau_that_lifts_a_starved_class_and_folds_into_the_head(tmp_path):
    import torch

    from semifer.bundled import adjustment_bias, prior_adjustment

    # Class 2 (disgust) is rare in training and its logits sit 1.0 below where they should be:
    # the balanced rule (tau 1, + log 10 ~ 2.3) over-corrects, tau 0.5 (+1.15) is right.
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (600,), generator=g)
    logits = torch.randn(600, 8, generator=g) * 0.3
    logits[torch.arange(600), y] += 1.0
    logits[:, 2] -= 1.0
    logits[:, 3:] -= 10.0
    prior = torch.tensor([0.45, 0.45, 0.1, 0, 0, 0, 0, 0])
    tau, by_tau = prior_adjustment(logits, y.numpy(), prior)
    assert by_tau[0.0] < by_tau[tau] and by_tau[1.5] < by_tau[tau] and 0.25 <= tau <= 0.75
    bias = adjustment_bias(prior, tau)
    assert bias[2] > bias[0] == bias[1] and torch.all(bias[3:] == 0)   # unseen classes untouched


def test_pack_folds_a_head_bias_into_the_weights(bundle_dir, tmp_path):
    import torch

    from semifer.eval.report import load_model

    bias = torch.arange(8, dtype=torch.float32) / 10
    plain = bundled.pack(tmp_path / "run", "plain", {}, bundle_dir)
    shifted = bundled.pack(tmp_path / "run", "shifted", {}, bundle_dir, head_bias=bias)
    x = torch.rand(3, 1, 24, 24)
    with torch.no_grad():
        diff = load_model(shifted)[0](x) - load_model(plain)[0](x)
    assert torch.allclose(diff, bias.expand(3, 8), atol=1e-5)


def test_pack_stores_big_weights_as_float16_and_loads_them_as_float32(bundle_dir, tmp_path):
    import torch

    from semifer.engine.checkpoint import load_checkpoint
    from semifer.eval.report import load_model

    full = bundled.pack(tmp_path / "run", "full", {}, bundle_dir, weights="float32")
    half = bundled.pack(tmp_path / "run", "half", {}, bundle_dir)
    stored = load_checkpoint(half)["model"]
    big = [k for k, v in stored.items() if v.is_floating_point() and v.numel() >= bundled.HALF_MIN_NUMEL]
    assert big and all(stored[k].dtype == torch.float16 for k in big)
    small = [k for k, v in stored.items() if v.is_floating_point() and k not in big]
    assert small and all(stored[k].dtype == torch.float32 for k in small)   # biases, batch-norm statistics
    assert half.stat().st_size < 0.75 * full.stat().st_size
    m_full, m_half = load_model(full)[0], load_model(half)[0]
    assert all(p.dtype == torch.float32 for p in m_half.parameters())
    x = torch.rand(4, 1, 24, 24)
    with torch.no_grad():
        a, b = m_full(x), m_half(x)
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=1e-2, rtol=1e-2)


def test_pack_int8_stores_big_weights_as_int8_with_channel_scales_and_loads_them_back(bundle_dir, tmp_path):
    import torch

    from semifer.eval.report import load_model

    full = bundled.pack(tmp_path / "run", "full8", {}, bundle_dir, weights="float32")
    small = bundled.pack(tmp_path / "run", "int8", {}, bundle_dir, weights="int8")
    raw = torch.load(small, weights_only=True)
    q = {k: v for k, v in raw["model"].items() if v.dtype == torch.int8}
    assert q and set(q) == set(raw["weight_scales"])
    ref = torch.load(full, weights_only=True)["model"]
    for k, v in q.items():
        assert v.abs().amax(dim=tuple(range(1, v.dim()))).eq(127).all()          # each output channel uses the range
        back = v.float() * raw["weight_scales"][k]
        assert (back - ref[k]).abs().max() <= raw["weight_scales"][k].max() / 2 + 1e-7   # within half a step
    assert small.stat().st_size < 0.45 * full.stat().st_size
    m_full, m_q = load_model(full)[0], load_model(small)[0]
    assert all(p.dtype == torch.float32 for p in m_q.parameters())
    x = torch.rand(4, 1, 24, 24)
    with torch.no_grad():
        a, b = m_full(x), m_q(x)
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=5e-2, rtol=5e-2)
    with pytest.raises(ValueError, match="weights must be"):
        bundled.pack(tmp_path / "run", "bad", {}, bundle_dir, weights="int4")


def test_mirror_average_is_the_mean_of_both_views_at_inference_only(bundle_dir, tmp_path):
    import torch

    from semifer.eval.report import load_model

    plain = load_model(bundled.pack(tmp_path / "run", "plain", {}, bundle_dir))[0]
    mirrored, cfg, _ = load_model(bundled.pack(tmp_path / "run", "mirrored", {}, bundle_dir, mirror_average=True))
    assert cfg.model.mirror_average
    x = torch.zeros(3, 1, 24, 24)
    x[..., :8] = 1.0                                              # bright left edge: its mirror differs
    with torch.no_grad():
        want = (plain(x) + plain(x.flip(3))) / 2
        assert torch.allclose(mirrored(x), want, atol=1e-6)
        assert not torch.equal(plain(x), plain(x.flip(3)))
        mirrored.train()
        plain.train()
        assert torch.allclose(mirrored(x), plain(x), atol=1e-5)   # training steps see one view


@pytest.mark.skipif(bundled.DEFAULT_MODEL not in bundled.available(), reason="the bundled model is not packed yet")
def test_fallback_detector_answers_where_the_first_finds_nothing():
    pytest.importorskip("facenet_pytorch")
    from skimage import data

    blind = {"threshold": 1.01, "retry_threshold": None}     # mtcnn that reports nothing
    off = semifer.Predictor(detector="mtcnn", detector_options=blind, rotations=(), fallback_detector=None)
    assert len(off.predict(data.astronaut())) == 0
    r = semifer.Predictor(detector="mtcnn", detector_options=blind, fallback_detector="dlib").predict(data.astronaut())
    assert len(r) == 1 and r.labels == ["Happiness"]
    # by default photos fall back on dlib's CNN detector (after the turned copies)
    d = semifer.Predictor(detector="mtcnn", detector_options=blind)
    assert d.fallback_name == "dlib_cnn" and d.rotations == (30.0, -30.0, 60.0, -60.0)
    r = d.predict(data.astronaut())
    assert len(r) == 1 and r.labels == ["Happiness"]


@pytest.mark.skipif(bundled.DEFAULT_MODEL not in bundled.available(), reason="the bundled model is not packed yet")
def test_default_photo_search_finds_no_face_on_a_cat_jpeg():
    pytest.importorskip("facenet_pytorch")
    import io

    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buf, "JPEG")
    cat = np.asarray(Image.open(buf).convert("RGB"))
    p = semifer.Predictor()
    assert p.rotations and p.fallback_name == "dlib_cnn"
    assert len(p.predict(cat)) == 0       # turned 30 degrees, mtcnn scores this cat 0.96


def test_an_ensemble_checkpoint_is_the_weighted_mean_of_its_members_everywhere(bundle_dir, tmp_path):
    """combine() + the ensemble backbone: one model whose logits are the weighted mean of the
    members' logits, loaded, mirror-averaged and exported like any checkpoint."""
    import torch

    from semifer.eval.report import load_model
    from semifer.models.ensemble import combine

    a = bundled.pack(tmp_path / "run", "a", {}, bundle_dir)
    b = bundled.pack(tmp_path / "run", "b", {}, bundle_dir, head_bias=torch.linspace(-1, 1, 8))
    with torch.no_grad():                                         # a member with other weights
        mb, cfg_b, ck = load_model(b)
        for p in mb.backbone.parameters():
            p.mul_(1.5)
    from semifer.config import to_dict
    from semifer.engine.checkpoint import atomic_save
    atomic_save({"model": mb.state_dict(), "config": to_dict(cfg_b), "labels": list(ABAW_LABELS), "step": 1}, b)
    out = bundled.ensemble_checkpoint([a, b], tmp_path / "ens.pt", weights=[1, 3])
    ens, cfg, _ = load_model(out)
    assert cfg.model.backbone == "ensemble" and len(cfg.model.backbone_args["members"]) == 2
    x = torch.rand(4, 1, 24, 24)
    with torch.no_grad():
        want = 0.25 * load_model(a)[0](x) + 0.75 * load_model(b)[0](x)
        assert torch.allclose(ens(x), want, atol=1e-5)
        assert not torch.allclose(load_model(a)[0](x), load_model(b)[0](x), atol=1e-3)
    named = bundled.pack(out, "ens", {"scores": {"accuracy": 0.1}}, bundle_dir, mirror_average=True, weights="float32")
    mirrored = load_model(named)[0]
    with torch.no_grad():
        assert torch.allclose(mirrored(x), (ens(x) + ens(x.flip(3))) / 2, atol=1e-5)
    with pytest.raises(ValueError, match="at least two"):
        combine([ens], [{"backbone": "ensemble"}])
    pytest.importorskip("onnxruntime")
    from semifer.infer.onnx_export import export_onnx
    import onnxruntime as ort
    onnx_path = export_onnx(named, tmp_path / "ens.onnx")
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"images": x.numpy()})[0]
    with torch.no_grad():
        assert np.allclose(logits, mirrored(x).numpy(), atol=1e-4)


def test_an_ensemble_card_reports_its_members_training_time_not_the_config_run(tmp_path):
    """train_bundled's card: an ensemble trains nothing, so its cost is its members' run clocks."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "train_bundled.py"
    spec = importlib.util.spec_from_file_location("train_bundled_script", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    run = tmp_path / "member_run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"wall_s": 1234.5, "best_step": 9}))
    assert mod.member_seconds(run) == 1234.5
    assert mod.member_seconds(tmp_path / "missing_run") is None
