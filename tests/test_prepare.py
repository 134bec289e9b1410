"""``semifer prepare``: crops + manifest, counted skips, and resuming without loss or duplicates."""
from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("dlib")
pytest.importorskip("cv2")
pytest.importorskip("skimage")

from semifer.faces.prepare import MANIFEST_COLUMNS, prepare  # noqa: E402
from tests.media_helpers import astronaut, broken_files, face_video  # noqa: E402


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.fixture()
def media(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(astronaut(256)).save(src / "astronaut.jpg", quality=95)
    from skimage import data

    Image.fromarray(data.coffee()).save(src / "coffee.png")  # no face
    face_video(src / "clip.avi", "FF-F")
    return src


@pytest.mark.badinput
def test_prepare_writes_aligned_crops_and_counts_skips(media, tmp_path):
    broken_files(media / "broken")
    out = tmp_path / "out"
    rep = prepare([str(media), str(tmp_path / "missing.jpg")], out, workers=1, progress=False)
    assert rep.sources_done == 3 and rep.frames == 1 + 1 + 4
    # astronaut: 1 face; coffee: none; video: the 3 frames that show her
    rows = _rows(out / "manifest.csv")
    assert rows[0] == MANIFEST_COLUMNS and len(rows) - 1 == rep.faces == 4
    by_source = {}
    for r in rows[1:]:
        by_source.setdefault(r[0].rsplit("/", 1)[-1], []).append(int(r[1]))
    assert by_source == {"astronaut.jpg": [0], "clip.avi": [0, 1, 3]}
    for r in rows[1:]:
        crop = Image.open(out / r[4])
        assert crop.size == (112, 112)
    assert rep.skips.counts == {"not an image": 1, "empty file": 1, "truncated image": 1,
                                "not an image or video": 1, "unreadable video": 1, "missing file": 1}
    ledger = _rows(out / "sources.csv")
    assert len(ledger) == 1 + 3 and {r[4] for r in ledger[1:]} == {"1", "0", "3"}


def test_prepare_resumes_without_loss_or_duplicates(media, tmp_path):
    out = tmp_path / "out"
    first = prepare([str(media)], out, progress=False)
    manifest = (out / "manifest.csv").read_bytes()
    again = prepare([str(media)], out, progress=False)
    assert again.sources_already_done == 3 and again.sources_done == 0 and again.frames == 0
    assert (out / "manifest.csv").read_bytes() == manifest

    # Killed after the astronaut's manifest rows were appended but before its ledger row,
    # in the middle of writing another row: the re-run drops the torn line and the
    # unconfirmed rows, does that source again, and keeps everything else.
    ledger = _rows(out / "sources.csv")
    kept = [r for r in ledger if not r[0].endswith("astronaut.jpg")]
    with open(out / "sources.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(kept)
    with open(out / "manifest.csv", "a") as f:
        f.write("/x/torn.jpg,0,0.000,0,crops/x")
    third = prepare([str(media)], out, progress=False)
    assert third.sources_done == 1 and third.sources_already_done == 2
    rows = _rows(out / "manifest.csv")
    assert sorted(map(tuple, rows)) == sorted(map(tuple, _rows_from(manifest)))
    assert len(_rows(out / "sources.csv")) == 4

    # A new file is the only work of the next run; a changed file is done again.
    Image.fromarray(np.fliplr(astronaut(200)).copy()).save(media / "mirror.png")
    fourth = prepare([str(media)], out, progress=False)
    assert fourth.sources_done == 1 and fourth.faces == 1 and len(_rows(out / "manifest.csv")) == 1 + first.faces + 1


def _rows_from(data: bytes):
    return list(csv.reader(data.decode().splitlines()))


@pytest.mark.badinput
def test_prepare_refuses_other_settings(media, tmp_path):
    out = tmp_path / "out"
    prepare([str(media / "coffee.png")], out, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        prepare([str(media / "coffee.png")], out, every=2, progress=False)


def test_prepare_in_a_worker_pool(media, tmp_path):
    rep = prepare([str(media / "astronaut.jpg"), str(media / "clip.avi")], tmp_path / "out", workers=2, progress=False)
    assert rep.sources_done == 2 and rep.faces == 4 and rep.skips.total == 0
    assert len(_rows(tmp_path / "out" / "manifest.csv")) == 5


def test_cli_prepare_and_detectors(media, tmp_path, capsys):
    from semifer.cli import main

    assert main(["detectors"]) == 0
    listed = capsys.readouterr().out
    assert "dlib" in listed and "scrfd" in listed
    out = tmp_path / "out"
    assert main(["prepare", str(media / "astronaut.jpg"), "--out", str(out), "--workers", "1", "--format", "png",
                 "--quiet"]) == 0
    assert "1 faces" in capsys.readouterr().out
    crops = list((out / "crops").rglob("*.png"))
    assert len(crops) == 1 and Image.open(crops[0]).size == (112, 112)
    assert main(["prepare", str(media), "--out", str(out), "--detector", "scrfd"]) == 2  # no model file
    assert "detector-model" in capsys.readouterr().err


def test_prepare_refuses_the_whole_image_detector_before_writing(tmp_path):
    from semifer.faces.prepare import prepare

    with pytest.raises(ValueError, match="needs a face detector"):
        prepare([str(tmp_path)], tmp_path / "out", detector="whole")
    assert not (tmp_path / "out").exists()


def test_crops_cut_in_another_face_frame_are_refused(tmp_path):
    import json

    from semifer.faces.prepare import check_frame, prepared_frame

    fer, plain, loose = tmp_path / "fer", tmp_path / "plain", tmp_path / "loose"
    for d, settings in ((fer, {"detector": "mtcnn", "frame": "fer2013"}), (plain, {"detector": "dlib"})):
        (d / "crops").mkdir(parents=True)
        (d / "prepare.json").write_text(json.dumps(settings))
        (d / "manifest.csv").write_text("")
    loose.mkdir()
    assert prepared_frame(f"folder:{fer / 'crops'}") == "fer2013"
    assert prepared_frame(f"list:{fer / 'manifest.csv'}") == "fer2013"
    assert prepared_frame(f"stream:folder:{fer}") == "fer2013"
    assert prepared_frame(f"folder:{plain / 'crops'}") == "arcface112"   # written before frames existed
    assert prepared_frame(f"folder:{loose}") is None and prepared_frame("synthetic:labeled") is None
    check_frame(f"folder:{fer / 'crops'}", "fer2013", "data.face_frame")
    check_frame(f"folder:{loose}", "fer2013", "data.face_frame")
    with pytest.raises(ValueError, match="data.face_frame=fer2013"):
        check_frame(f"folder:{fer / 'crops'}", "arcface112", "data.face_frame")
    with pytest.raises(ValueError, match="--frame fer2013"):
        check_frame(f"folder:{plain / 'crops'}", "fer2013", "data.face_frame")
