"""``semifer predict`` / ``export`` and ``semifer.Predictor``: CSV rows, no-face frames, ONNX parity."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

pytest.importorskip("dlib")
pytest.importorskip("cv2")
pytest.importorskip("skimage")

import semifer  # noqa: E402
from semifer.cli import main  # noqa: E402
from semifer.labels import ABAW_LABELS  # noqa: E402
from tests.media_helpers import astronaut, broken_files, face_video  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory with an untrained 1-channel 32 px model: size and channels must come from its config."""
    from semifer.config import load_config, to_dict
    from semifer.engine.checkpoint import atomic_save
    from semifer.models import build_model

    cfg = load_config(base={"data": {"image_size": 32, "channels": 1},
                            "model": {"backbone": "small_cnn", "backbone_args": {"width": 8}}})
    torch.manual_seed(0)
    model = build_model(cfg.model, len(ABAW_LABELS), in_chans=1)
    with torch.no_grad():  # larger random weights, so probabilities differ clearly between inputs
        for p in model.parameters():
            if p.dim() > 1:
                p.add_(torch.randn_like(p) * 0.1)
    run = tmp_path_factory.mktemp("run")
    atomic_save({"model": model.state_dict(), "step": 7, "config": to_dict(cfg), "labels": list(ABAW_LABELS)},
                run / "checkpoints" / "best.pt")
    return run


@pytest.fixture(scope="module")
def onnx_path(run_dir, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert main(["export", str(run_dir), "--onnx", str(path)]) == 0
    return path


def test_onnx_matches_torch(run_dir, onnx_path):
    from semifer.infer.onnx_export import OnnxClassifier, TorchClassifier

    t, o = TorchClassifier(run_dir), OnnxClassifier(onnx_path)
    assert (o.image_size, o.channels) == (t.image_size, t.channels) == (32, 1)
    rng = np.random.default_rng(0)
    # batch of 5 (the export example had 2); brightness from dark to light so outputs differ
    x = (rng.random((5, 1, 32, 32)) * np.linspace(0.1, 1.0, 5)[:, None, None, None]).astype(np.float32)
    pt, po = t(x), o(x)
    assert pt.shape == po.shape == (5, 8)
    assert np.abs(pt - po).max() < 1e-4
    assert np.abs(pt - pt[:1]).max() > 1e-2  # inputs really give different outputs
    with torch.no_grad():
        logits = t.model(torch.from_numpy(x)).numpy()
    onnx_logits = o.session.run(["logits"], {"images": x})[0]
    assert np.abs(logits - onnx_logits).max() < 1e-4


def test_torch_classifier_runs_channels_last_with_unchanged_outputs(run_dir):
    from semifer.eval.report import load_model
    from semifer.infer.onnx_export import TorchClassifier

    t = TorchClassifier(run_dir)
    conv = next(m for m in t.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    plain, _, _ = load_model(run_dir)   # the same checkpoint, default (NCHW) layout
    x = np.random.default_rng(1).random((3, 1, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = torch.softmax(plain(torch.from_numpy(x)), 1).numpy()
    assert np.abs(t(x) - expected).max() < 1e-5


def test_predictor_api_torch_and_onnx(run_dir, onnx_path):
    img = astronaut(512)
    r = semifer.Predictor(run_dir).predict(img)
    assert len(r) == 1 and r.boxes.shape == (1, 4) and r.probs.shape == (1, 8)
    np.testing.assert_allclose(r.probs.sum(1), 1.0, atol=1e-5)
    assert r.labels == [ABAW_LABELS[int(r.probs.argmax())]]
    ro = semifer.Predictor(str(onnx_path)).predict(img)
    np.testing.assert_allclose(ro.boxes, r.boxes)
    assert np.abs(ro.probs - r.probs).max() < 1e-4
    from skimage import data

    none = semifer.Predictor(run_dir).predict(data.coffee())
    assert len(none) == 0 and none.probs.shape == (0, 8) and none.labels == []


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_video_rows_are_frames_times_faces(run_dir, tmp_path, capsys):
    video = face_video(tmp_path / "clip.avi", "FF-F-")
    out = tmp_path / "pred"
    assert main(["predict", str(run_dir), str(video), "--out", str(out), "--abaw", "txt", "--annotate",
                 "--batch-size", "2", "--quiet"]) == 0
    rows = _read(out / "predictions.csv")
    assert [(int(r["frame"]), r["face"]) for r in rows] == [(0, "0"), (1, "0"), (2, ""), (3, "0"), (4, "")]
    for r in rows:
        if r["face"]:
            p = np.array([float(r[k]) for k in ABAW_LABELS])
            assert abs(p.sum() - 1) < 1e-4 and r["label"] == ABAW_LABELS[int(p.argmax())]
            assert float(r["x2"]) > float(r["x1"]) and float(r["score"]) > 0
        else:
            assert r["label"] == "none" and r["Neutral"] == "" and r["x1"] == ""
    assert [float(r["timestamp"]) for r in rows] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    lines = (out / "abaw" / "clip.txt").read_text().splitlines()
    assert lines[0] == ",".join(ABAW_LABELS) and len(lines) == 1 + 5
    labels = {int(r["frame"]): ABAW_LABELS.index(r["label"]) for r in rows if r["face"]}
    assert [int(x) for x in lines[1:]] == [labels[0], labels[1], labels[1], labels[3], labels[3]]  # nearest fill
    assert len(list((out / "annotated").glob("*.mp4"))) == 1
    printed = capsys.readouterr().out
    assert "frames/s" in printed and "5 frames, 3 faces" in printed


def test_smoothing_follows_faces(run_dir, tmp_path):
    from semifer.infer.run import Smoother

    s = Smoother(0.5)
    b = np.array([[0, 0, 10, 10.0]])
    p1, p2 = np.eye(8)[[0]], np.eye(8)[[1]]
    np.testing.assert_allclose(s(b, p1), p1)
    np.testing.assert_allclose(s(b + 1, p2), 0.5 * p1 + 0.5 * p2)       # same face, moved a little
    np.testing.assert_allclose(s(b + 100, p1), p1)                     # a new face starts fresh
    two = s(np.vstack([b + 100, b]), np.vstack([p2, p2]))
    np.testing.assert_allclose(two, np.vstack([0.5 * p1 + 0.5 * p2, p2]))
    with pytest.raises(ValueError):
        Smoother(1.0)


@pytest.mark.badinput
def test_predict_counts_bad_inputs_and_keeps_going(run_dir, tmp_path, capsys):
    bad = broken_files(tmp_path / "in")
    from PIL import Image

    Image.fromarray(astronaut(256)).save(tmp_path / "in" / "ok.png")
    out = tmp_path / "pred"
    assert main(["predict", str(run_dir), str(tmp_path / "in"), str(tmp_path / "nothing.jpg"),
                 "--out", str(out), "--quiet"]) == 0
    rows = _read(out / "predictions.csv")
    assert len(rows) == 1 and rows[0]["source"].endswith("ok.png") and rows[0]["face"] == "0"
    printed = capsys.readouterr().out
    # Some inputs skipped: exit 0, and the count on a line of its own.
    assert any(line.startswith(f"skipped {len(bad) + 1} input(s)") for line in printed.splitlines())


@pytest.mark.badinput
def test_predict_with_nothing_readable_fails_with_reasons_first(run_dir, tmp_path, capsys):
    (tmp_path / "notes.jpg").write_text("this is text, not a JPEG")
    out = tmp_path / "pred"
    rc = main(["predict", str(run_dir), str(tmp_path / "missing.jpg"), str(tmp_path / "notes.jpg"),
               "--out", str(out), "--quiet"])
    assert rc == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("semifer predict: no input could be read (2 skipped)")
    assert any("missing.jpg" in line for line in err[1:3]) and any("notes.jpg" in line for line in err[1:3])


@pytest.mark.badinput
def test_abaw_files_check_frame_counts(run_dir, tmp_path):
    from semifer.infer.run import predict_media, write_abaw_from_csv

    video = face_video(tmp_path / "clip.avi", "F-F")
    rep = predict_media(semifer.Predictor(run_dir), [str(video)], tmp_path / "p", progress=False)
    with pytest.raises(ValueError, match="frame 2 .*2 frames"):
        write_abaw_from_csv(rep.csv, tmp_path / "a", frame_counts={"clip": 2})
    files = write_abaw_from_csv(rep.csv, tmp_path / "a", layout="single")
    lines = open(files[0]).read().splitlines()
    assert lines[0].startswith("image_location,Neutral") and lines[1].startswith("clip/00001.jpg,")
    assert len(lines) == 1 + 3
    assert main(["abaw", str(rep.csv), "--out", str(tmp_path / "b"), "--frame-counts", str(_counts(tmp_path))]) == 2


def _counts(tmp_path):
    p = tmp_path / "counts.csv"
    p.write_text("clip,1\n")
    return p


@pytest.mark.badinput
def test_bad_checkpoint_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "x.pt").write_bytes(b"garbage")
    assert main(["predict", str(tmp_path / "x.pt"), str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a readable semifer checkpoint" in capsys.readouterr().err


def test_annotation_label_is_legible_and_scaled_to_the_face():
    from semifer.infer.run import _annotate

    img = np.full((400, 400, 3), 128, np.uint8)
    probs = np.eye(8, dtype=np.float32)[[4, 4]]
    small = _annotate(img, np.array([[50.0, 60.0, 110.0, 120.0]]), probs[:1])
    large = _annotate(img, np.array([[50.0, 160.0, 350.0, 390.0]]), probs[:1])

    def label_height(out, top):  # rows above the box that the dark label background covers
        col = out[:top, 55]
        return int((col.sum(axis=1) < 60).sum())

    h_small, h_large = label_height(small, 60), label_height(large, 160)
    assert h_small >= 12 and h_large > 2 * h_small      # readable at minimum, grows with the face
    # Yellow text pixels inside the dark box.
    box = large[160 - h_large:160, 50:300]
    assert ((box[..., 0] > 200) & (box[..., 1] > 180) & (box[..., 2] < 80)).sum() > 50


def test_predictor_and_export_crop_in_the_models_face_frame(run_dir, tmp_path):
    """A model trained on FER2013-framed crops gets FER2013-framed crops, also through ONNX."""
    from semifer.engine.checkpoint import atomic_save, load_checkpoint
    from semifer.faces.align import BOX_FRAMES, align_face, box_frame_matrix, upright_crop

    ck = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    ck["config"]["data"]["face_frame"] = "fer2013"
    fer_run = tmp_path / "fer_run"
    atomic_save(ck, fer_run / "checkpoints" / "best.pt")
    img = astronaut(512)
    plain, fer = semifer.Predictor(run_dir), semifer.Predictor(fer_run)
    faces, crops = fer.detect(img)
    # FER2013's frame is cut straight at the model's input size (one resampling), from the detector's box
    size = fer.classifier.image_size
    offsets = BOX_FRAMES["fer2013"][faces[0].detector]
    expected = upright_crop(img, box_frame_matrix(faces[0].box, offsets, size), size)
    assert expected.shape == (size, size, 3)
    np.testing.assert_array_equal(crops[0], expected)
    arcface = align_face(img, faces[0].landmarks, faces[0].scheme, size)
    assert np.abs(crops[0].astype(float) - arcface).mean() > 5  # not the ArcFace crop
    pytest.importorskip("onnxscript")
    onnx = tmp_path / "fer.onnx"
    assert main(["export", str(fer_run), "--onnx", str(onnx)]) == 0
    via_onnx = semifer.Predictor(str(onnx))
    assert via_onnx.classifier.face_frame == "fer2013"
    np.testing.assert_array_equal(via_onnx.detect(img)[1][0], expected)


class _CountingDetector:
    """Finds one fixed face; counts full detections and re-fits."""

    scheme = "arcface5"

    def __init__(self, lose_at: int | None = None) -> None:
        self.calls, self.refits, self.lose_at, self.frame = [], [], lose_at, 0

    def _face(self):
        from semifer.faces.detectors import Face
        from semifer.faces.align import ARCFACE_112

        return Face(np.array([10.0, 10.0, 122.0, 122.0]), 0.99, ARCFACE_112 + 10, self.scheme)

    def __call__(self, image):
        self.calls.append(self.frame)
        return [self._face()]

    def refine(self, image, faces):
        self.refits.append(self.frame)
        return [] if self.frame == self.lose_at else [self._face() for _ in faces]


def test_video_tracking_detects_every_n_frames_and_again_when_a_face_is_lost(run_dir):
    pred = semifer.Predictor(run_dir, detect_every=3)
    frame = np.zeros((160, 160, 3), np.uint8)
    pred.detector = det = _CountingDetector()
    for i in range(7):
        det.frame = i
        faces, crops = pred.track(frame)
        assert len(faces) == len(crops) == 1
    assert det.calls == [0, 3, 6] and det.refits == [1, 2, 4, 5]
    pred.reset_tracking()
    pred.detector = det = _CountingDetector(lose_at=1)
    for i in range(5):
        det.frame = i
        pred.track(frame)
    assert det.calls == [0, 2] and det.refits == [1, 3, 4]  # lost at 1 -> full detection at 2
    pred.detector = det = _CountingDetector()
    pred.detect_every = 1
    for i in range(3):
        det.frame = i
        pred.track(frame)
    assert det.calls == [0, 1, 2] and det.refits == []
