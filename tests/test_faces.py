"""Detection and alignment: dlib on real photos skimage ships, SCRFD decoding, Umeyama."""
from __future__ import annotations

import numpy as np
import pytest

from semifer.faces.align import ARCFACE_112, TEMPLATES, align_face, umeyama
from semifer.faces.detectors import decode_scrfd
from semifer.registry import DETECTORS

skdata = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def dlib_detector():
    pytest.importorskip("dlib")
    from semifer.faces import build_detector

    return build_detector("dlib")


def test_detectors_registered_on_import():
    import semifer  # noqa: F401

    assert {"dlib", "scrfd"} <= set(DETECTORS.names())


def test_umeyama_recovers_a_similarity():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    a, s, t = 0.4, 1.7, np.array([12.0, -3.0])
    r = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    dst = s * src @ r.T + t
    m = umeyama(src, dst)
    np.testing.assert_allclose(m[:, :2], s * r, atol=1e-9)
    np.testing.assert_allclose(m[:, 2], t, atol=1e-9)


def test_align_puts_landmarks_on_the_template():
    # A dot at each landmark of a rotated, scaled face must land on the template points.
    img = np.zeros((300, 400, 3), np.uint8)
    a, s = 0.3, 2.2
    r = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    lm = s * ARCFACE_112 @ r.T + np.array([150.0, 20.0])
    for x, y in lm:
        img[int(round(y)) - 2:int(round(y)) + 3, int(round(x)) - 2:int(round(x)) + 3] = 255
    crop = align_face(img, lm, "arcface5")
    assert crop.shape == (112, 112, 3)
    for x, y in ARCFACE_112:
        assert crop[int(round(y)), int(round(x))].min() > 100
    assert crop.mean() < 20  # only the dots, nothing else copied


def test_astronaut_has_exactly_one_face(dlib_detector):
    img = skdata.astronaut()
    faces = dlib_detector(img)
    assert len(faces) == 1
    f = faces[0]
    x1, y1, x2, y2 = f.box
    assert 150 < x1 < x2 < 290 and 50 < y1 < y2 < 190  # her face, top middle of the photo
    assert f.landmarks.shape == (5, 2) and f.scheme == "dlib5" and f.detector == "dlib"
    assert ((f.landmarks >= [x1 - 5, y1 - 5]) & (f.landmarks <= [x2 + 5, y2 + 5])).all()
    # aligned: the eyes' landmarks map near their template places
    m = umeyama(f.landmarks, TEMPLATES["dlib5"])
    mapped = f.landmarks @ m[:, :2].T + m[:, 2]
    assert np.abs(mapped - TEMPLATES["dlib5"]).max() < 3.0
    crop = align_face(img, f.landmarks, f.scheme)
    assert crop.shape == (112, 112, 3) and crop.std() > 20


@pytest.mark.parametrize("name", ["coffee", "chelsea", "rocket", "immunohistochemistry", "brick"])
def test_pictures_without_faces(dlib_detector, name):
    img = getattr(skdata, name)()
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    assert dlib_detector(img) == []


def _scrfd_outputs(size: int = 64):
    """Crafted SCRFD outputs for a size x size input: one face centred on the stride-8 cell (4, 4)."""
    outs = []
    counts = [(size // s) ** 2 * 2 for s in (8, 16, 32)]
    scores = [np.full((n, 1), 0.01, np.float32) for n in counts]
    boxes = [np.ones((n, 4), np.float32) for n in counts]
    kps = [np.zeros((n, 10), np.float32) for n in counts]
    i = (4 * (size // 8) + 4) * 2  # cell (row 4, col 4), anchor 0 -> centre (32, 32)
    scores[0][i] = 0.9
    boxes[0][i] = [2, 2, 2, 2]  # x stride 8 = 16 px each side
    kps[0][i] = np.array([[-1, -1], [1, -1], [0, 0], [-1, 1], [1, 1]], np.float32).ravel()
    scores[0][i + 1] = 0.8  # the same face from the second anchor: removed by NMS
    boxes[0][i + 1] = [2, 2, 2.2, 2.2]
    scores[1][0] = 0.7  # another face on the stride-16 grid, centre (0, 0)
    boxes[1][0] = [0.5, 0.5, 1, 1]
    outs = scores + boxes + kps
    return [o[None] for o in outs]  # batch dimension, as exported models have


def test_scrfd_decoding_on_crafted_outputs():
    boxes, scores, kps = decode_scrfd(_scrfd_outputs(), (64, 64), threshold=0.5)
    assert len(boxes) == 2
    np.testing.assert_allclose(scores, [0.9, 0.7], atol=1e-6)
    np.testing.assert_allclose(boxes[0], [16, 16, 48, 48])
    np.testing.assert_allclose(boxes[1], [-8, -8, 16, 16])
    np.testing.assert_allclose(kps[0], [[24, 24], [40, 24], [32, 32], [24, 40], [40, 40]])
    assert len(decode_scrfd(_scrfd_outputs(), (64, 64), threshold=0.95)[0]) == 0


@pytest.mark.badinput
def test_scrfd_wrong_outputs_are_clear_errors():
    with pytest.raises(ValueError, match="9 or 15"):
        decode_scrfd(_scrfd_outputs()[:6], (64, 64))
    with pytest.raises(ValueError, match="anchors expected"):
        decode_scrfd(_scrfd_outputs(), (128, 128))


def test_scrfd_detector_through_onnxruntime(tmp_path):
    """A tiny ONNX model that returns the crafted outputs: preprocessing, session and rescaling."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    from semifer.faces import build_detector

    outs = _scrfd_outputs()
    names = [f"out{i}" for i in range(9)]
    # Each output = constant + 0 * mean(input), so the graph really consumes the image.
    nodes = [helper.make_node("ReduceMean", ["input.1"], ["m"], keepdims=0),
             helper.make_node("Mul", ["m", "zero"], ["z"])]
    inits = [numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    for n, o in zip(names, outs):
        inits.append(numpy_helper.from_array(o, f"c_{n}"))
        nodes.append(helper.make_node("Add", [f"c_{n}", "z"], [n]))
    graph = helper.make_graph(nodes, "scrfd_stub",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 64, 64])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(o.shape)) for n, o in zip(names, outs)],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path = tmp_path / "scrfd_stub.onnx"
    onnx.save(model, str(path))

    det = build_detector("scrfd", model=str(path), threshold=0.5)
    assert det.input_hw == (64, 64)  # taken from the model's fixed input shape
    img = np.zeros((96, 128, 3), np.uint8)  # letterboxed at scale 0.5
    faces = det(img)
    assert [round(f.score, 3) for f in faces] == [0.9, 0.7]
    np.testing.assert_allclose(faces[0].box, [32, 32, 96, 96], atol=1e-4)
    np.testing.assert_allclose(faces[0].landmarks[2], [64, 64], atol=1e-4)
    assert faces[0].scheme == "arcface5"


@pytest.mark.badinput
def test_scrfd_needs_a_model_file(tmp_path):
    from semifer.faces import build_detector

    with pytest.raises(ValueError, match="detector-model"):
        build_detector("scrfd")
    with pytest.raises(FileNotFoundError):
        build_detector("scrfd", model=str(tmp_path / "none.onnx"))
    with pytest.raises(KeyError, match="registered: .*dlib"):
        build_detector("haar")


# ----------------------------------------------------------------------------- face frames


def test_frame_templates_map_arcface_points_through_the_frame():
    from semifer.faces.align import FRAMES, frame_template

    np.testing.assert_allclose(frame_template("arcface5", "arcface112"), ARCFACE_112)
    np.testing.assert_allclose(frame_template("arcface5", "arcface112", 48), ARCFACE_112 * 48 / 112)
    fer = frame_template("arcface5", "fer2013", 48)
    # FER2013's crops are tighter than ArcFace's: the face is larger and the eyes sit higher
    assert np.ptp(fer[:, 0]) > 1.05 * np.ptp(ARCFACE_112[:, 0]) * 48 / 112
    assert fer[:2, 1].mean() < ARCFACE_112[:2, 1].mean() * 48 / 112
    assert abs(fer[:, 0].mean() - 24) < 1.5  # centred
    with pytest.raises(KeyError, match="known"):
        frame_template("arcface5", "nope")
    assert set(FRAMES) >= {"arcface112", "fer2013"}


def test_align_in_the_fer2013_frame_puts_landmarks_on_its_template():
    from semifer.faces.align import frame_template

    img = np.zeros((300, 400, 3), np.uint8)
    lm = 1.8 * ARCFACE_112 + np.array([120.0, 40.0])
    for x, y in lm:
        img[int(round(y)) - 2:int(round(y)) + 3, int(round(x)) - 2:int(round(x)) + 3] = 255
    crop = align_face(img, lm, "arcface5", 112, frame="fer2013")
    for x, y in frame_template("arcface5", "fer2013", 112):
        assert crop[int(round(y)), int(round(x))].min() > 100
    tight = (crop > 100).any(2).sum()
    loose = (align_face(img, lm, "arcface5", 112) > 100).any(2).sum()
    assert tight > 1.1 * loose  # the same dots cover more pixels in the tighter frame


def test_face_frame_is_checked_and_free_to_change_on_resume(tmp_path):
    from semifer.config import ConfigError, load_config
    from semifer.engine.rundir import prepare_run_dir

    with pytest.raises(ConfigError, match="face_frame"):
        load_config(overrides=["data.face_frame=fer2014"])
    cfg = load_config(overrides=[f"run.out={tmp_path / 'r'}"])
    prepare_run_dir(cfg)
    (tmp_path / "r" / "checkpoints").mkdir()
    (tmp_path / "r" / "checkpoints" / "last.pt").write_bytes(b"")
    cfg.data.face_frame = "fer2013"
    prepare_run_dir(cfg)  # describes the crops only: the run still resumes
    cfg.optim.lr = 0.5
    with pytest.raises(RuntimeError, match="different config"):
        prepare_run_dir(cfg)


# ----------------------------------------------------------------------------- MTCNN


@pytest.fixture(scope="module")
def mtcnn():
    pytest.importorskip("facenet_pytorch", reason="facenet-pytorch (make install adds it) is not installed")
    from semifer.faces import build_detector

    return build_detector("mtcnn")


def test_mtcnn_finds_the_astronaut_and_refits_her_in_a_moved_frame(mtcnn):
    img = skdata.astronaut()
    faces = mtcnn(img)
    assert len(faces) == 1 and faces[0].scheme == "arcface5" and faces[0].detector == "mtcnn"
    x1, y1, x2, y2 = faces[0].box
    assert 150 < x1 < x2 < 290 and 40 < y1 < y2 < 190
    lm = faces[0].landmarks
    assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]      # eyes, mouth corners left to right
    assert lm[:2, 1].max() < lm[2, 1] < lm[3:, 1].min()      # eyes above nose above mouth
    moved = np.roll(img, (6, 9), axis=(0, 1))
    refit = mtcnn.refine(moved, faces)
    assert len(refit) == 1
    assert np.abs(refit[0].landmarks - mtcnn(moved)[0].landmarks).max() < 4.0
    assert np.abs(refit[0].landmarks - lm - [9, 6]).max() < 4.0
    assert mtcnn.refine(skdata.coffee(), faces) == []  # no face there any more


def test_mtcnn_searches_again_with_looser_stages_only_where_nothing_was_found(mtcnn, monkeypatch):
    calls = []
    real = mtcnn.net.detect

    def spy(img, landmarks=True):
        calls.append(list(mtcnn.net.thresholds))
        return real(img, landmarks=landmarks)

    monkeypatch.setattr(mtcnn.net, "detect", spy)
    assert len(mtcnn(skdata.astronaut())) == 1
    assert calls == [mtcnn.stage_thresholds]                          # found at once: one pass
    calls.clear()
    assert mtcnn(skdata.coffee()) == []
    assert calls == [mtcnn.stage_thresholds, mtcnn.retry_stage_thresholds]   # nothing: a looser second pass
    assert mtcnn.net.thresholds == mtcnn.stage_thresholds                    # ... and the usual stages restored


@pytest.mark.parametrize("name", ["coffee", "chelsea", "rocket", "brick"])
def test_mtcnn_pictures_without_faces(mtcnn, name):
    img = getattr(skdata, name)()
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    assert mtcnn(img) == []


def test_detect_rotated_finds_a_tilted_face_and_maps_it_back(dlib_detector):
    from PIL import Image

    from semifer.faces.detectors import detect_rotated

    img = skdata.astronaut()
    ref = dlib_detector(img)[0]
    tilted = np.asarray(Image.fromarray(img).rotate(-50, resample=Image.BILINEAR))  # clockwise, same size
    assert dlib_detector(tilted) == []                      # HOG's frontal model misses a 50 degree tilt
    faces = detect_rotated(dlib_detector, tilted, (25.0, 50.0))
    assert len(faces) == 1
    t = np.deg2rad(-50)  # where the reference landmarks went: PIL turns counter-clockwise by the angle
    rot = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])
    c = np.array([img.shape[1] / 2, img.shape[0] / 2])
    expected = (ref.landmarks - c) @ rot.T + c
    assert np.abs(faces[0].landmarks - expected).max() < 6.0
    x1, y1, x2, y2 = faces[0].box
    assert ((faces[0].landmarks >= [x1, y1]) & (faces[0].landmarks <= [x2, y2])).all()
    assert detect_rotated(dlib_detector, skdata.coffee(), (25.0, 50.0)) == []


def test_auto_detector_is_mtcnn_where_installed_else_dlib(monkeypatch):
    import importlib.util

    from semifer.faces import detectors

    real = importlib.util.find_spec
    installed = real("facenet_pytorch") is not None
    assert detectors.default_detector() == ("mtcnn" if installed else "dlib")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "facenet_pytorch" else real(name, *a))
    assert detectors.default_detector() == "dlib"


def test_fer2013_frame_crops_upright_boxes_and_keeps_the_head_tilt():
    from semifer.faces.align import frame_template, scale_shift

    img = np.zeros((300, 400, 3), np.uint8)
    theta = np.deg2rad(20)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    lm = (1.8 * ARCFACE_112) @ rot.T + np.array([150.0, 40.0])   # a face tilted by 20 degrees
    for x, y in lm:
        img[int(round(y)) - 2:int(round(y)) + 3, int(round(x)) - 2:int(round(x)) + 3] = 255
    m = scale_shift(lm, frame_template("arcface5", "fer2013", 112))
    assert m[0, 1] == 0 and m[1, 0] == 0 and m[0, 0] == pytest.approx(m[1, 1])   # no rotation
    upright = align_face(img, lm, "arcface5", 112, frame="fer2013")
    turned = align_face(img, lm, "arcface5", 112, frame="arcface112")
    # the eyes: level after the similarity alignment, still 20 degrees apart in the fer2013 crop
    def eye_rows(crop):
        ys, xs = np.nonzero(crop[:, :, 0] > 100)
        left, right = ys[xs < np.median(xs) - 10], ys[xs > np.median(xs) + 10]
        return left.min(), right.min()
    l_t, r_t = eye_rows(turned)
    l_u, r_u = eye_rows(upright)
    assert abs(int(l_t) - int(r_t)) <= 2
    assert int(r_u) - int(l_u) > 8


def test_upright_crop_is_one_antialiased_resize_of_the_mapped_box():
    from PIL import Image

    from semifer.faces.align import upright_crop

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    # scale 0.25, shift (-10, -5): output pixel u <- input (u + 10) / 0.25 .. so the 24 px crop
    # covers input x 40..136, y 20..116
    m = np.array([[0.25, 0.0, -10.0], [0.0, 0.25, -5.0]])
    crop = upright_crop(img, m, 24)
    want = np.asarray(Image.fromarray(img).resize((24, 24), Image.Resampling.LANCZOS, box=(40, 20, 136, 116)))
    np.testing.assert_array_equal(crop, want)
    # antialiased: a 1-px checkerboard shrunk 4x is flat grey
    checker = ((np.indices((96, 96)).sum(0) % 2) * 255).astype(np.uint8)[..., None].repeat(3, 2)
    flat = upright_crop(checker, np.array([[0.25, 0.0, 0.0], [0.0, 0.25, 0.0]]), 24)
    assert flat.std() < 3 and abs(flat.mean() - 127.5) < 3
    # a box that leaves the photo: black outside, the photo inside
    out = upright_crop(img, np.array([[1.0, 0.0, 20.0], [0.0, 1.0, 20.0]]), 40)
    assert out[:18, :18].max() == 0
    np.testing.assert_array_equal(out[22:, 22:], img[2:20, 2:20])


def test_detect_rotated_keeps_the_box_size_around_the_turned_back_centre():
    from semifer.faces.detectors import Face, detect_rotated

    class OneBox:  # finds the same box in whatever (turned) image it is given
        def __call__(self, image):
            return [Face(np.array([40.0, 30.0, 100.0, 110.0]), 0.9, np.zeros((5, 2)) + 70.0, "arcface5", "mtcnn")]

    img = np.zeros((120, 160, 3), np.uint8)
    (f,) = detect_rotated(OneBox(), img, (30.0,))
    x1, y1, x2, y2 = f.box
    assert (x2 - x1, y2 - y1) == pytest.approx((60.0, 80.0))       # not the 1.3x larger bounds
    assert f.detector == "mtcnn"
    # the box centre (70, 70) of the turned canvas maps back like the landmarks (all at 70, 70)
    np.testing.assert_allclose([(x1 + x2) / 2, (y1 + y2) / 2], f.landmarks[0], atol=1e-9)


def test_box_frame_places_the_crop_around_the_box():
    from semifer.faces.align import box_frame_matrix

    # box side sqrt(100 * 100) = 100; crop 1.2 sides, centre shifted (+0.1, -0.05) sides
    m = box_frame_matrix(np.array([100.0, 50.0, 200.0, 150.0]), (np.log(1.2), 0.1, -0.05), 48)
    corners = np.array([[100.0, 35.0, 1.0], [220.0, 155.0, 1.0]]) @ m.T
    np.testing.assert_allclose(corners, [[0, 0], [48, 48]], atol=1e-9)


def test_crop_face_cuts_measured_detectors_from_the_box_and_others_from_the_landmarks(monkeypatch):
    from semifer.faces import align
    from semifer.faces.align import crop_face, upright_crop
    from semifer.faces.detectors import Face

    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (200, 240, 3), dtype=np.uint8)
    lm = 0.9 * ARCFACE_112 + [60.0, 40.0]
    box = np.array([70.0, 50.0, 150.0, 140.0])
    monkeypatch.setitem(align.BOX_FRAMES, "fer2013", {"mtcnn": (0.2, 0.0, 0.1)})
    boxed = crop_face(img, Face(box, 0.9, lm, "arcface5", "mtcnn"), 48, "fer2013")
    np.testing.assert_array_equal(boxed, upright_crop(img, align.box_frame_matrix(box, (0.2, 0.0, 0.1), 48), 48))
    # a detector whose boxes were not measured, or a frame that is not cut upright: the landmarks
    for face, frame in ((Face(box, 0.9, lm, "arcface5", "scrfd"), "fer2013"),
                        (Face(box, 0.9, lm, "arcface5", "mtcnn"), "arcface112")):
        np.testing.assert_array_equal(crop_face(img, face, 48, frame), align_face(img, lm, "arcface5", 48, frame))
    assert not np.array_equal(boxed, align_face(img, lm, "arcface5", 48, "fer2013"))
    whole = Face(np.array([0.0, 0.0, 240.0, 200.0]), 1.0, np.zeros((5, 2)), "whole", "whole")
    assert crop_face(img, whole, 48, "fer2013") is img
