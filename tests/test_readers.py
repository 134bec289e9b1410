"""Labeled data-set readers (semifer.data.readers) on small generated fixtures.

Every fixture image is a flat colour whose red channel encodes the ABAW index of its
class by name (``_level``), so a test can check that each decoded row carries the
label of the image it came from, not only that label counts match.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semifer.config import DataConfig
from semifer.data import readers
from semifer.data.formats import load_source
from semifer.labels import ABAW_LABELS, label_index
from semifer.registry import FORMATS

SEVEN = ("folder", "csv", "fer2013", "rafdb", "affectnet", "expw", "affwild2")


def _level(abaw: int) -> int:
    return 30 + 25 * abaw


def _img(abaw: int, size: int = 40) -> Image.Image:
    v = _level(abaw)
    return Image.new("RGB", (size, size), (v, 255 - v, 128))


def _save(path: Path, abaw: int, size: int = 40, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _img(abaw, size).save(path, format=fmt)
    return path


def _check_content(data) -> None:
    """Every labeled row's red level decodes back to its label (grey sets: the luma level differs, skip)."""
    for img, y in zip(data.images, data.labels):
        if y >= 0 and img.shape[0] == 3:
            assert abs(img[0].float().mean().item() - _level(int(y))) < 8, (int(y), img[0].float().mean())


def _cfg(size: int = 32, channels: int = 3) -> DataConfig:
    return DataConfig(image_size=size, channels=channels)


def _jpeg_bytes(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, "JPEG")
    return b.getvalue()


def _write_bad_inputs(d: Path) -> None:
    """One of each unusable kind, plus three convertible odd modes (CMYK, 16-bit grey, palette)."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    good = _jpeg_bytes(noisy)
    (d / "z_corrupt.jpg").write_bytes(good[:200] + rng.integers(0, 255, 2000, dtype=np.uint8).tobytes())
    (d / "z_truncated.jpg").write_bytes(good[: len(good) // 2])
    (d / "z_empty.jpg").write_bytes(b"")
    (d / "z_text.jpg").write_text("this is not an image\n")
    _img(label_index("sad")).convert("CMYK").save(d / "y_cmyk.jpg", "JPEG")
    Image.fromarray((np.arange(1600).reshape(40, 40) * 40).astype(np.uint16)).save(d / "y_16bit.png")
    assert Image.open(d / "y_16bit.png").mode.startswith("I")
    _img(label_index("sad")).convert("P").save(d / "y_palette.png")
    assert Image.open(d / "y_palette.png").mode == "P"


BAD_COUNTS = {"corrupt image": 1, "truncated image": 1, "empty file": 1, "not an image": 1}


# ---------------------------------------------------------------------------------- registry


def test_all_seven_formats_registered(capsys):
    from semifer.cli import main

    assert set(SEVEN) <= set(FORMATS.names())
    assert main(["formats"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert set(SEVEN) <= listed


# ---------------------------------------------------------------------------------- folder


def _folder_fixture(root: Path) -> dict[str, int]:
    counts = {"angry": 3, "Happy": 4, "SAD": 2, "contempt": 2, "neutral": 3}
    for name, n in counts.items():
        y = label_index(name)
        for i in range(n):
            sub = root / name / ("nested" if i == 0 else "")
            ext = (".jpg", ".PNG", ".jpeg", ".bmp")[i % 4]
            _save(sub / f"img{i}{ext}", y)
    (root / "happy_notes.txt").write_text("ignored: not a folder")
    (root / "angry" / "readme.txt").write_text("ignored: not an image extension")
    return {ABAW_LABELS[label_index(k)]: v for k, v in counts.items()}


@pytest.mark.parametrize("size,channels", [(32, 3), (24, 1)])
def test_folder_labels_by_name_counts_and_shape(tmp_path, size, channels):
    expected = _folder_fixture(tmp_path)
    data = FORMATS.get("folder")(str(tmp_path), _cfg(size, channels))
    assert data.images.dtype == torch.uint8 and tuple(data.images.shape) == (14, channels, size, size)
    got = {ABAW_LABELS[k]: int(n) for k, n in enumerate(data.class_counts(8)) if n}
    assert got == expected  # angry->Anger, Happy->Happiness, SAD->Sadness, contempt->Other
    assert data.skipped == {}
    _check_content(data)
    again = FORMATS.get("folder")(str(tmp_path), _cfg(size, channels))
    assert torch.equal(again.labels, data.labels) and torch.equal(again.images, data.images)


def test_folder_unknown_class_names_folder_and_known(tmp_path):
    _folder_fixture(tmp_path)
    _save(tmp_path / "bored" / "a.jpg", 0)
    with pytest.raises(ValueError) as e:
        FORMATS.get("folder")(str(tmp_path), _cfg())
    assert "bored" in str(e.value) and "angry" in str(e.value) and "happy" in str(e.value)


def test_folder_through_load_source_with_options(tmp_path):
    _folder_fixture(tmp_path)
    data = load_source(f"folder:{tmp_path}?classes=happy,sad", _cfg(28, 3))
    assert tuple(data.images.shape) == (6, 3, 28, 28)
    assert sorted(set(data.labels.tolist())) == [label_index("happy"), label_index("sad")]
    assert data.name.startswith("folder:")
    with pytest.raises(ValueError, match="unsupported option"):
        load_source(f"folder:{tmp_path}?split=train", _cfg())


@pytest.mark.badinput
def test_folder_bad_inputs_skipped_and_counted(tmp_path):
    _save(tmp_path / "happy" / "ok.jpg", label_index("happy"))
    _write_bad_inputs(tmp_path / "sad")
    data = FORMATS.get("folder")(str(tmp_path), _cfg())
    assert data.skipped == BAD_COUNTS
    assert len(data) == 4  # ok.jpg + CMYK + 16-bit + palette decode, four broken ones are skipped
    assert data.labels.tolist().count(label_index("sad")) == 3
    # sorted order: happy/ok.jpg, sad/y_16bit.png, sad/y_cmyk.jpg, sad/y_palette.png
    assert data.images[1].float().std() > 10  # 16-bit gradient scaled to 8 bits, not a blank
    for i in (0, 2, 3):
        assert abs(data.images[i][0].float().mean().item() - _level(int(data.labels[i]))) < 8


def test_decode_records_order_empty_set_and_progress_only_when_large(tmp_path, monkeypatch):
    _save(tmp_path / "a.png", 1)
    calls = []
    monkeypatch.setattr(readers, "PROGRESS_MIN_RECORDS", 2)
    import tqdm as tqdm_mod
    real = tqdm_mod.tqdm

    def spy(*a, **k):
        calls.append(k.get("total"))
        return real(*a, **{**k, "disable": True})
    monkeypatch.setattr(tqdm_mod, "tqdm", spy)
    recs = [(tmp_path / "a.png", 1, f"r{i}", None) for i in range(3)]
    data, kept = readers.decode_records(recs, _cfg(16, 3))
    assert len(data) == 3 and kept == ["r0", "r1", "r2"] and calls == [3]
    data, _ = readers.decode_records(recs[:2], _cfg(16, 3))
    assert calls == [3]
    empty, _ = readers.decode_records([], _cfg(16, 1))
    assert tuple(empty.images.shape) == (0, 1, 16, 16)
    _save(tmp_path / "b.png", 5)
    mixed = [(tmp_path / "a.png", 1, "a", None), (tmp_path / "nope.png", 2, "nope", None), (tmp_path / "b.png", 5, "b", None)]
    for recs2, total in ((mixed, None), (iter(mixed), None), (iter(mixed), 1), (iter(mixed), 9)):
        d, kept = readers.decode_records(recs2, _cfg(16, 3), total=total)
        assert kept == ["a", "b"] and d.labels.tolist() == [1, 5] and d.skipped == {"missing file": 1}
        _check_content(d)
    empty, _ = readers.decode_records(iter([]), _cfg(16, 1))
    assert tuple(empty.images.shape) == (0, 1, 16, 16)


# ---------------------------------------------------------------------------------- csv


def _csv_fixture(root: Path) -> Path:
    rows = ["path,label,split"]
    for i, (name, split) in enumerate([("happy", "train"), ("angry", "train"), ("Surprise", "train"),
                                       ("sad", "val"), ("fear", "val"), ("", "train")]):
        y = label_index(name) if name else 2
        rel = f"imgs/{i}.png"
        _save(root / rel, y)
        rows.append(f"{rel},{name},{split}")
    rows.append(f"{root / 'imgs' / '0.png'},happy,val")  # absolute path inside the root is fine
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    return root / "m.csv"


def test_csv_labels_split_and_unlabeled(tmp_path):
    m = _csv_fixture(tmp_path)
    data = FORMATS.get("csv")(str(m), _cfg())
    assert len(data) == 7
    assert data.labels.tolist() == [label_index(n) for n in ("happy", "angry", "surprise", "sad", "fear")] + [-1, label_index("happy")]
    _check_content(data)
    train = load_source(f"csv:{m}?split=train", _cfg(20, 1))
    assert train.labels.tolist() == [label_index("happy"), label_index("angry"), label_index("surprise"), -1]
    assert tuple(train.images.shape) == (4, 1, 20, 20)
    val = FORMATS.get("csv")(str(m), _cfg(), split="val")
    assert len(val) == 3


def test_csv_root_option_and_missing_file(tmp_path):
    other = tmp_path / "elsewhere"
    _save(other / "x" / "a.jpg", label_index("disgust"))
    (tmp_path / "m.csv").write_text("path,label\nx/a.jpg,disgust\nx/missing.jpg,fear\n")
    data = FORMATS.get("csv")(str(tmp_path / "m.csv"), _cfg(), root=str(other))
    assert data.labels.tolist() == [label_index("disgust")]
    assert data.skipped == {"missing file": 1}


@pytest.mark.badinput
def test_csv_errors_name_file_and_line(tmp_path):
    _save(tmp_path / "a.png", 0)
    m = tmp_path / "manifest.csv"
    m.write_text("path,label\na.png,neutral\na.png,bored\n")
    with pytest.raises(ValueError, match=r"manifest\.csv:3.*bored"):
        FORMATS.get("csv")(str(m), _cfg())
    m.write_text("path,label\na.png,neutral\n\na.png,neutral,extra\n")
    with pytest.raises(ValueError, match=r"manifest\.csv:4"):
        FORMATS.get("csv")(str(m), _cfg())
    m.write_text("path,label\na.png,neutral\n")
    with pytest.raises(ValueError, match="no split column"):
        FORMATS.get("csv")(str(m), _cfg(), split="train")


@pytest.mark.badinput
def test_csv_path_escape_skipped_and_counted(tmp_path):
    root = tmp_path / "data"
    _save(root / "ok.png", label_index("happy"))
    _write_bad_inputs(root / "bad")
    bad = sorted(p.name for p in (root / "bad").iterdir())
    lines = ["path,label", "ok.png,happy", "../../etc/passwd,happy", "/etc/passwd,sad", "sub/../../ok.png,happy"]
    lines += [f"bad/{n},sad" for n in bad]
    (root / "m.csv").write_text("\n".join(lines) + "\n")
    data = FORMATS.get("csv")(str(root / "m.csv"), _cfg())
    assert data.skipped == {**BAD_COUNTS, "path outside data root": 3}
    assert len(data) == 4


# ---------------------------------------------------------------------------------- fer2013

FER = ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")


def _fer_fixture(path: Path) -> list[tuple[int, np.ndarray, str]]:
    rng = np.random.default_rng(3)
    rows = []
    usages = ["Training"] * 5 + ["PublicTest"] * 3 + ["PrivateTest"] * 2
    for i, u in enumerate(usages):
        e = i % 7
        px = rng.integers(0, 256, (48, 48), dtype=np.uint8)
        rows.append((e, px, u))
    text = "emotion,pixels,Usage\n" + "".join(f"{e},{' '.join(map(str, px.ravel()))},{u}\n" for e, px, u in rows)
    path.write_text(text)
    return rows


def test_fer2013_labels_pixels_and_splits(tmp_path):
    f = tmp_path / "fer2013.csv"
    rows = _fer_fixture(f)
    data = FORMATS.get("fer2013")(str(f), _cfg(48, 1))
    assert data.labels.tolist() == [label_index(FER[e]) for e, _, _ in rows]
    assert torch.equal(data.images[:, 0], torch.from_numpy(np.stack([px for _, px, _ in rows])))
    assert len(FORMATS.get("fer2013")(str(f), _cfg(), split="Training")) == 5
    assert len(load_source(f"fer2013:{f}?split=val", _cfg())) == 3
    test = FORMATS.get("fer2013")(str(f), _cfg(32, 3), split="test")
    assert tuple(test.images.shape) == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="split"):
        FORMATS.get("fer2013")(str(f), _cfg(), split="holdout")


@pytest.mark.badinput
@pytest.mark.parametrize("bad_row,what", [
    ("3," + " ".join(["1"] * 2303) + ",Training", "2304"),
    ("3," + " ".join(["1"] * 2303) + " x,Training", "integer"),
    ("7," + " ".join(["1"] * 2304) + ",Training", "emotion"),
    ("3," + " ".join(["1"] * 2304), "columns"),
])
def test_fer2013_malformed_row(tmp_path, bad_row, what):
    f = tmp_path / "fer_bad.csv"
    good = "0," + " ".join(["5"] * 2304) + ",Training"
    f.write_text(f"emotion,pixels,Usage\n{good}\n{good}\n{bad_row}\n")
    with pytest.raises(ValueError, match=rf"fer_bad\.csv:4: .*{what}"):
        FORMATS.get("fer2013")(str(f), _cfg())


# ---------------------------------------------------------------------------------- rafdb

RAF = ("Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral")


def _raf_fixture(root: Path) -> list[tuple[str, int]]:
    items = [(f"train_{i:05d}.jpg", i % 7 + 1) for i in range(1, 9)] + [(f"test_{i:04d}.jpg", i % 7 + 1) for i in range(1, 5)]
    (root / "EmoLabel").mkdir(parents=True)
    (root / "EmoLabel" / "list_patition_label.txt").write_text("".join(f"{n} {lab}\n" for n, lab in items))
    for j, (n, lab) in enumerate(items):
        y = label_index(RAF[lab - 1])
        if j == 2:
            _save(root / "Image" / "aligned" / n, y)  # only the original name: fallback
        else:
            _save(root / "Image" / "aligned" / n.replace(".jpg", "_aligned.jpg"), y)
    return items


def test_rafdb_labels_and_split(tmp_path):
    items = _raf_fixture(tmp_path)
    data = FORMATS.get("rafdb")(str(tmp_path), _cfg())
    assert data.labels.tolist() == [label_index(RAF[lab - 1]) for _, lab in items]
    assert data.skipped == {}
    _check_content(data)
    assert len(load_source(f"rafdb:{tmp_path}?split=train", _cfg())) == 8
    assert len(FORMATS.get("rafdb")(str(tmp_path), _cfg(), split="test")) == 4


@pytest.mark.badinput
def test_rafdb_malformed_line(tmp_path):
    _raf_fixture(tmp_path)
    lst = tmp_path / "EmoLabel" / "list_patition_label.txt"
    lst.write_text(lst.read_text() + "train_09999.jpg 8\n")
    with pytest.raises(ValueError, match=r"list_patition_label\.txt:13"):
        FORMATS.get("rafdb")(str(tmp_path), _cfg())
    lst.write_text("train_00001.jpg\n")
    with pytest.raises(ValueError, match=r"list_patition_label\.txt:1"):
        FORMATS.get("rafdb")(str(tmp_path), _cfg())


# ---------------------------------------------------------------------------------- affectnet

AFN_HEADER = "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal"


def _affectnet_fixture(root: Path) -> Path:
    """Expressions 0..10, one image each; code 1 (Happy) sits inside a larger image and is cropped by its box."""
    names = ["Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger", "Contempt", "Other", "Neutral", "Neutral"]
    rows = [AFN_HEADER]
    for code, name in enumerate(names):
        rel = f"{code % 3}/img{code}.jpg"
        y = label_index(name)
        if code == 1:  # face of class Happy at (20, 10, 40x40) inside an 80x60 Anger-coloured image
            big = _img(label_index("anger"), 80).crop((0, 0, 80, 60))
            big.paste(_img(y, 40), (20, 10))
            (root / "Manually_Annotated_Images" / rel).parent.mkdir(parents=True, exist_ok=True)
            big.save(root / "Manually_Annotated_Images" / rel)
            box = "20,10,40,40"
        else:
            _save(root / "Manually_Annotated_Images" / rel, y)
            box = "0,0,0,0" if code == 2 else ",,,"  # invalid / absent boxes -> whole image
        rows.append(f'{rel},{box},"1.0;2.0;3.0",{code},0.1,-0.2')
    f = root / "training.csv"
    f.write_text("\n".join(rows) + "\n")
    return f


def test_affectnet_policy_crop_and_drops(tmp_path):
    f = _affectnet_fixture(tmp_path)
    data = FORMATS.get("affectnet")(str(f), _cfg())
    other = label_index("Other")
    assert data.labels.tolist() == [label_index(n) for n in ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger")] + [other, other]
    assert data.skipped == {"dropped label": 2}  # 9 Uncertain, 10 Non-Face
    _check_content(data)  # the Happy row is the cropped face, not the Anger-coloured frame
    d2 = load_source(f"affectnet:{f}?contempt=drop", _cfg())
    assert d2.labels.tolist().count(other) == 1 and d2.skipped == {"dropped label": 3}
    d3 = FORMATS.get("affectnet")(str(f), _cfg(), contempt="drop", none="drop", root=str(tmp_path))
    assert other not in d3.labels.tolist() and d3.skipped == {"dropped label": 4}
    with pytest.raises(ValueError, match="contempt"):
        FORMATS.get("affectnet")(str(f), _cfg(), contempt="keep")


@pytest.mark.badinput
def test_affectnet_malformed(tmp_path):
    f = _affectnet_fixture(tmp_path)
    text = f.read_text().splitlines()
    text[4] = text[4].rsplit(",", 3)[0] + ",11,0.1,0.1"
    f.write_text("\n".join(text) + "\n")
    with pytest.raises(ValueError, match=r"training\.csv:5: .*expression"):
        FORMATS.get("affectnet")(str(f), _cfg())


# ---------------------------------------------------------------------------------- expw

EXPW = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


def _expw_fixture(root: Path, nested: bool = True) -> list[int]:
    img_dir = root / ("image/origin" if nested else "origin")
    img_dir.mkdir(parents=True)
    lines, labels = [], []
    for i in range(4):
        canvas = Image.new("RGB", (120, 60), (0, 0, 0))
        faces = [(i % 7, 5, 10), ((i + 3) % 7, 5, 65)] if i % 2 == 0 else [(i % 7, 10, 30)]
        for fid, (lab, top, left) in enumerate(faces):
            canvas.paste(_img(label_index(EXPW[lab]), 40), (left, top))
            lines.append(f"img{i}.jpg {fid} {top} {left} {left + 40} {top + 40} 0.{9 - fid} {lab}")
            labels.append(label_index(EXPW[lab]))
        canvas.save(img_dir / f"img{i}.jpg", quality=95)
    lst = root / ("label/label.lst" if nested else "label.lst")
    lst.parent.mkdir(parents=True, exist_ok=True)
    lst.write_text("\n".join(lines) + "\n")
    return labels


@pytest.mark.parametrize("nested", [True, False])
def test_expw_faces_cropped_and_labeled(tmp_path, nested, monkeypatch):
    labels = _expw_fixture(tmp_path, nested)
    srcs = []
    real = readers.decode_image
    monkeypatch.setattr(readers, "decode_image", lambda src, *a, **k: (srcs.append(type(src).__name__), real(src, *a, **k))[1])
    data = FORMATS.get("expw")(str(tmp_path), _cfg(24, 3))
    assert data.labels.tolist() == labels and len(data) == 6 and data.skipped == {}
    _check_content(data)
    # two-face images are read once and cropped from the decoded array; one-face images decode directly
    assert srcs.count("ndarray") == 4 and len(srcs) - srcs.count("ndarray") == 2
    assert len(FORMATS.get("expw")(str(tmp_path), _cfg(), min_confidence="0.85")) == 4


@pytest.mark.badinput
def test_expw_malformed(tmp_path):
    _expw_fixture(tmp_path)
    lst = tmp_path / "label" / "label.lst"
    lst.write_text(lst.read_text() + "img9.jpg 0 1 2 3 4 0.5 9\n")
    with pytest.raises(ValueError, match=r"label\.lst:7"):
        FORMATS.get("expw")(str(tmp_path), _cfg())


# ---------------------------------------------------------------------------------- affwild2

HEADER = "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other"


def _aff_fixture(root: Path, flat: bool = False) -> dict:
    ann = root if flat else root / "annotations" / "EXPR_Classification_Challenge"
    vids = {("Train_Set", "10-60-1280x720"): [0, 4, -1, 7, 4, -1],
            ("Train_Set", "video2_left"): [1, 1, 2, -1],
            ("Validation_Set", "118-30-640x480"): [6, -1, 3]}
    for (split, v), vals in vids.items():
        (ann / split).mkdir(parents=True, exist_ok=True)
        (ann / split / f"{v}.txt").write_text(HEADER + "\n" + "\n".join(map(str, vals)) + "\n")
        for i, val in enumerate(vals, 1):
            if (v, i) == ("video2_left", 2):
                continue  # missing frame
            _save(root / "cropped_aligned" / v / f"{i:05d}.jpg", max(val, 0), size=32)
    return vids


def test_affwild2_labeled_modes_and_splits(tmp_path):
    _aff_fixture(tmp_path)
    cfg = _cfg(24, 3)
    train = FORMATS.get("affwild2")(str(tmp_path), cfg, split="train")
    # header order == ABAW order by name
    assert train.labels.tolist() == [0, 4, 7, 4, 1, 2]
    assert train.skipped == {"missing frame": 1}
    assert train.frames == [("10-60-1280x720", 1), ("10-60-1280x720", 2), ("10-60-1280x720", 4),
                            ("10-60-1280x720", 5), ("video2_left", 1), ("video2_left", 3)]
    _check_content(train)
    unl = FORMATS.get("affwild2")(str(tmp_path), cfg, split="Train_Set", labeled="0")
    assert unl.labels.tolist() == [-1, -1, -1] and unl.frames[-1] == ("video2_left", 4)
    allf = load_source(f"affwild2:{tmp_path}?split=train&labeled=all", cfg)
    assert len(allf) == 9 and (allf.labels == -1).sum() == 3
    assert allf.frames is not None and len(allf.frames) == 9  # survives load_source
    val = FORMATS.get("affwild2")(str(tmp_path), cfg, split="val")
    assert val.labels.tolist() == [6, 3]
    one = FORMATS.get("affwild2")(str(tmp_path), cfg, split="train", videos="video2_left")
    assert one.labels.tolist() == [1, 2]
    both = FORMATS.get("affwild2")(str(tmp_path), cfg)
    assert len(both) == 8
    assert readers.affwild2_videos(tmp_path, "train") == ["10-60-1280x720", "video2_left"]
    assert readers.affwild2_videos(tmp_path, "Validation_Set") == ["118-30-640x480"]
    with pytest.raises(ValueError, match="nope"):
        FORMATS.get("affwild2")(str(tmp_path), cfg, split="train", videos="nope")


def test_affwild2_flat_layout_and_options(tmp_path):
    _aff_fixture(tmp_path / "a", flat=True)
    data = FORMATS.get("affwild2")(str(tmp_path / "a"), _cfg(), split="val")
    assert data.labels.tolist() == [6, 3]
    data = FORMATS.get("affwild2")(str(tmp_path / "x"), _cfg(), split="val", annotations=str(tmp_path / "a"),
                                   frames=str(tmp_path / "a" / "cropped_aligned"))
    assert data.labels.tolist() == [6, 3]
    assert readers.affwild2_videos(tmp_path / "x", "train", annotations=str(tmp_path / "a" / "Train_Set")) == \
        ["10-60-1280x720", "video2_left"]


@pytest.mark.badinput
@pytest.mark.parametrize("body,line", [
    ("Neutral,Anger,Disgust,Fear,Happy,Sadness,Surprise,Other\n0\n", 1),
    (HEADER + "\n0\n1\nx\n", 4),
    (HEADER + "\n0\n8\n", 3),
    (HEADER + "\n0\n-2\n", 3),
])
def test_affwild2_malformed_annotation(tmp_path, body, line):
    _aff_fixture(tmp_path)
    f = tmp_path / "annotations" / "EXPR_Classification_Challenge" / "Validation_Set" / "118-30-640x480.txt"
    f.write_text(body)
    with pytest.raises(ValueError, match=rf"118-30-640x480\.txt:{line}:"):
        FORMATS.get("affwild2")(str(tmp_path), _cfg(), split="val")


def test_readers_map_by_name_not_index():
    """The dataset class tables resolve through semifer.labels (a rename there would surface here)."""
    assert [ABAW_LABELS[label_index(c)] for c in readers.FER2013_CLASSES] == \
        ["Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise", "Neutral"]
    assert ABAW_LABELS[label_index(readers.RAFDB_CLASSES[0])] == "Surprise"
    assert re.fullmatch(r"[A-Za-z,]+", readers.AFFWILD2_HEADER)


def test_images_format_loads_an_unlabeled_folder(tmp_path):
    from PIL import Image

    from semifer.config import DataConfig
    from semifer.data.formats import load_source

    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (20, 20), (200, 10, 10)).save(tmp_path / "a" / "x.jpg")
    Image.new("RGB", (30, 30), (10, 200, 10)).save(tmp_path / "a" / "b" / "y.png")
    (tmp_path / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    data = load_source(f"images:{tmp_path / 'a'}", DataConfig(image_size=16, channels=3))
    assert data.images.shape == (2, 3, 16, 16) and data.labels.tolist() == [-1, -1]
    assert sum(data.skipped.values()) == 1
