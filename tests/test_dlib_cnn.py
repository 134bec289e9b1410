"""dlib_cnn: dlib's CNN (MMOD) face detector, weights from face_recognition_models, offline."""
from __future__ import annotations

import csv
import importlib.machinery
import importlib.util

import numpy as np
import pytest

from semifer.registry import DETECTORS

skdata = pytest.importorskip("skimage.data")
pytest.importorskip("dlib")


@pytest.fixture(scope="module")
def cnn():
    from semifer.faces import build_detector

    return build_detector("dlib_cnn")


def test_registered_and_listed(capsys):
    import semifer  # noqa: F401
    from semifer.cli import main

    assert "dlib_cnn" in DETECTORS.names()
    assert main(["detectors"]) == 0
    assert any(line.split()[0] == "dlib_cnn" for line in capsys.readouterr().out.splitlines() if line.strip())


def test_astronaut_has_exactly_one_face_where_hog_finds_it(cnn):
    from semifer.faces import build_detector
    from semifer.faces.align import TEMPLATES, umeyama

    img = skdata.astronaut()
    faces = cnn(img)
    assert len(faces) == 1
    f = faces[0]
    assert f.scheme == "dlib5" and f.landmarks.shape == (5, 2) and f.score >= cnn.threshold
    hog = build_detector("dlib")(img)[0]
    centre, hog_centre = (f.box[:2] + f.box[2:]) / 2, (hog.box[:2] + hog.box[2:]) / 2
    assert np.abs(centre - hog_centre).max() < 15                      # the same face
    side, hog_side = f.box[2:] - f.box[:2], hog.box[2:] - hog.box[:2]
    assert (0.7 < side / hog_side).all() and (side / hog_side < 1.4).all()
    x1, y1, x2, y2 = f.box
    assert ((f.landmarks >= [x1 - 5, y1 - 5]) & (f.landmarks <= [x2 + 5, y2 + 5])).all()
    m = umeyama(f.landmarks, TEMPLATES["dlib5"])                       # landmarks fit the template
    assert np.abs(f.landmarks @ m[:, :2].T + m[:, 2] - TEMPLATES["dlib5"]).max() < 3.0


def test_big_frames_are_searched_smaller_and_boxes_mapped_back(cnn):
    from PIL import Image

    from semifer.faces import build_detector

    head = skdata.astronaut()[:256, 96:352]
    ref = cnn(head)[0]
    big = np.asarray(Image.fromarray(head).resize((512, 512), Image.BILINEAR))
    faces = build_detector("dlib_cnn", max_side=256)(big)    # searched at 256 px, as `head`
    assert len(faces) == 1
    assert np.abs(faces[0].box - 2 * ref.box).max() < 12      # in the 512 px frame's pixels
    assert np.abs(faces[0].landmarks - 2 * ref.landmarks).max() < 8


def test_coffee_has_no_face(cnn):
    assert cnn(skdata.coffee()) == []


def test_missing_weights_file_is_a_clear_error(tmp_path, monkeypatch):
    from semifer.faces import build_detector, detectors

    # a face_recognition_models install with the landmark model but without the MMOD weights
    (tmp_path / "face_recognition_models" / "models").mkdir(parents=True)
    (tmp_path / "face_recognition_models" / "models" / "shape_predictor_5_face_landmarks.dat").symlink_to(
        detectors.dlib_model_path())
    real = importlib.util.find_spec
    fake = importlib.machinery.ModuleSpec("face_recognition_models", None, is_package=True)
    fake.submodule_search_locations = [str(tmp_path / "face_recognition_models")]
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: fake if name == "face_recognition_models" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="dlib_cnn.*mmod_human_face_detector.dat"):
        build_detector("dlib_cnn")
    with pytest.raises(FileNotFoundError, match="dlib_cnn.*nowhere.dat"):
        build_detector("dlib_cnn", weights=str(tmp_path / "nowhere.dat"))


def test_predict_falls_back_to_dlib_cnn(tmp_path):
    pytest.importorskip("facenet_pytorch")
    import semifer.bundled as bundled
    from PIL import Image

    from semifer.cli import main

    if bundled.DEFAULT_MODEL not in bundled.available():
        pytest.skip("the bundled model is not packed yet")
    Image.fromarray(skdata.astronaut()[:256, 96:352]).save(tmp_path / "astro.png")  # her head, a quarter of the cost
    blind = ["--detector", "mtcnn", "--detector-opt", "threshold=1.01", "--detector-opt", "retry_threshold=null"]
    assert main(["predict", str(tmp_path / "astro.png"), "--out", str(tmp_path / "p"), *blind,
                 "--fallback-detector", "dlib_cnn", "--quiet"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "p" / "predictions.csv")))
    assert len(rows) == 1 and rows[0]["label"] == "Happiness"
    assert 150 - 96 < float(rows[0]["x1"]) < float(rows[0]["x2"]) < 290 - 96
