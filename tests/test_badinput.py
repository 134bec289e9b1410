"""Bad input everywhere: every reader, the unlabeled stream, ``prepare`` and ``predict``.

One table of bad files (corrupt, truncated, zero-byte, decompression bombs, odd modes) is
fed to every reader that reads image files; unusable ones must be counted skips, odd modes
must decode. Folders also get a symlink loop and a non-UTF-8 file name. Broken annotation
files must be errors naming FILE:LINE (or the file). A malicious pickle passed as a
checkpoint is refused everywhere a checkpoint is read, and its payload never runs.
"""
from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semifer.config import DataConfig
from semifer.data.formats import load_source
from semifer.registry import FORMATS
from tests.test_readers import _aff_fixture, _affectnet_fixture, _csv_fixture, _expw_fixture, _folder_fixture, \
    _raf_fixture

pytestmark = pytest.mark.badinput

NON_UTF8 = os.fsdecode(b"caf\xe9.jpg")  # a Latin-1 file name, as a surrogate-escaped str


def png_header(w: int, h: int) -> bytes:
    """A valid PNG header claiming w x h pixels with a tiny body: what a decompression bomb looks like."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _encode(img: Image.Image, fmt: str) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt)
    return b.getvalue()


def bad_variant(kind: str, original: Image.Image) -> bytes:
    """The bytes of ``original`` spoiled as ``kind`` (odd modes keep its size, so face boxes still fit)."""
    rgb = original.convert("RGB")
    jpeg = _encode(rgb, "JPEG")
    grey16 = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257))
    return {
        "empty": b"",
        "truncated": jpeg[: len(jpeg) // 2],
        "corrupt": jpeg[:200] + np.random.default_rng(0).integers(0, 255, 2000, dtype=np.uint8).tobytes(),
        "bomb": png_header(100_000, 100_000),         # > 2x MAX_IMAGE_PIXELS: PIL raises
        "bomb_warn": png_header(10_000, 10_000),      # between 1x and 2x: PIL only warns
        "cmyk": _encode(rgb.convert("CMYK"), "JPEG"),
        "16bit": _encode(grey16, "PNG"),
        "palette": _encode(rgb.convert("P"), "PNG"),
        "la": _encode(rgb.convert("LA"), "PNG"),
        "1bit": _encode(rgb.convert("1"), "PNG"),
    }[kind]


REASON = {"empty": "empty file", "truncated": "truncated image", "corrupt": "corrupt image",
          "bomb": "image too large", "bomb_warn": "image too large"}
KINDS = list(REASON) + ["cmyk", "16bit", "palette", "la", "1bit"]
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp"}


def _csv(root: Path) -> str:
    return str(_csv_fixture(root))


def _affectnet(root: Path) -> str:
    return str(_affectnet_fixture(root))


READERS = {  # format -> fixture builder returning the PATH of FORMAT:PATH
    "folder": lambda r: (_folder_fixture(r), str(r))[1],
    "images": lambda r: (_folder_fixture(r), str(r))[1],
    "csv": _csv,
    "rafdb": lambda r: (_raf_fixture(r), str(r))[1],
    "affectnet": _affectnet,
    "expw": lambda r: (_expw_fixture(r), str(r))[1],
    "affwild2": lambda r: (_aff_fixture(r), str(r))[1],
}


@pytest.mark.parametrize("fmt", sorted(READERS))
def test_every_reader_counts_unusable_images_and_decodes_odd_modes(tmp_path, fmt):
    path = READERS[fmt](tmp_path)
    cfg = DataConfig(image_size=24, channels=3)
    before = FORMATS.get(fmt)(path, cfg)
    files = sorted(p for p in tmp_path.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    used: Counter = Counter()
    for i, f in enumerate(files):                     # spoil the referenced files in turn, all kinds
        kind = KINDS[i % len(KINDS)]
        f.write_bytes(bad_variant(kind, Image.open(f)))
        used[kind] += 1
    data = FORMATS.get(fmt)(path, cfg)
    new = Counter(data.skipped) - Counter(before.skipped)
    expected = {REASON[k] for k in used if k in REASON}
    assert set(new) <= expected, (fmt, dict(new), dict(used))
    if fmt not in ("affectnet", "affwild2"):      # these two never read some files (dropped/unlabeled rows)
        assert set(new) == expected, (fmt, dict(new), dict(used))
    assert len(data) + sum(new.values()) == len(before)          # every sample is kept or counted
    if fmt not in ("affectnet", "affwild2"):
        assert len(data) >= sum(n for k, n in used.items() if k not in REASON)   # odd modes decode
    assert data.images.dtype == torch.uint8 and data.images.shape[1:] == (3, 24, 24)


def _loop_and_non_utf8(folder: Path, img: Image.Image) -> None:
    """A folder symlinked into itself (and its parent), and a non-UTF-8 file name."""
    os.symlink(folder, folder / "loop", target_is_directory=True)
    os.symlink(folder.parent, folder / "up", target_is_directory=True)
    img.save(os.fsencode(folder / NON_UTF8), "JPEG")


@pytest.mark.parametrize("spec", ["folder", "images", "stream"])
def test_symlink_loops_and_non_utf8_names(tmp_path, spec):
    _folder_fixture(tmp_path)
    n = len(FORMATS.get("folder")(str(tmp_path), DataConfig(image_size=16)))
    _loop_and_non_utf8(tmp_path / "angry", Image.new("RGB", (30, 30), (200, 20, 20)))
    if spec == "stream":
        from semifer.data.unlabeled import open_unlabeled
        src = open_unlabeled(f"folder:{tmp_path}")
        names = [src.path(i) for i in range(len(src))]
        assert len(names) == n + 1 and any(NON_UTF8 in p for p in names)   # loops followed once
        assert src.read(names.index(next(p for p in names if NON_UTF8 in p))) is not None
        return
    data = load_source(f"{spec}:{tmp_path}", DataConfig(image_size=16))
    assert len(data) == n + 1 and data.skipped == {}


@pytest.mark.parametrize("fmt,body", [
    ("csv", b""), ("csv", b"path,label\n\xff\xfe\x00garbage,happy,\x80\n"),
    ("fer2013", b""), ("fer2013", b"emotion,pixels,Usage\n3,1 2 3,Training\n"),
    ("npz", b""), ("npz", b"PK\x03\x04 truncated zip"),
    ("affectnet", b"subDirectory_filePath,face_x\nx.jpg,1\n"),
])
def test_broken_annotation_files_are_clear_errors(tmp_path, fmt, body):
    f = tmp_path / "ann.file"
    f.write_bytes(body)
    with pytest.raises(ValueError, match=r"ann\.file"):
        load_source(f"{fmt}:{f}", DataConfig(image_size=16))


# ------------------------------------------------------------------------ malicious checkpoints

class _Payload:
    """Unpickling this creates a file: the proof that a pickle ran code."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def _evil(tmp_path: Path) -> tuple[Path, Path]:
    target = tmp_path / "pwned"
    ck = tmp_path / "run" / "checkpoints" / "best.pt"
    ck.parent.mkdir(parents=True)
    torch.save({"model": {"w": _Payload(target)}, "step": 1, "config": {}}, ck)
    return ck, target


@pytest.mark.parametrize("how", ["evaluate", "predict", "pretrained", "resume"])
def test_malicious_pickle_checkpoint_is_refused_and_never_runs(tmp_path, how, tiny_data):
    from semifer.cli import main

    ck, target = _evil(tmp_path)
    if how == "evaluate":
        assert main(["evaluate", str(ck.parent.parent)]) != 0
    elif how == "predict":
        pytest.importorskip("dlib")
        assert main(["predict", str(ck), str(tmp_path), "--out", str(tmp_path / "o"), "--quiet"]) != 0
    elif how == "pretrained":
        import semifer
        from tests.conftest import tiny_config
        cfg = tiny_config(tiny_data, tmp_path / "t", algorithm="supervised", steps=1,
                          model={"pretrained": str(ck)})
        with pytest.raises(Exception, match="weights_only|Unsupported global|not a readable"):
            semifer.train(cfg)
    else:  # a planted last.pt in a run directory being resumed
        import semifer
        from tests.conftest import tiny_config
        cfg = tiny_config(tiny_data, tmp_path / "r", algorithm="supervised", steps=1)
        semifer.train(cfg)
        shutil.copy(ck, tmp_path / "r" / "checkpoints" / "last.pt")
        with pytest.raises(ValueError, match="not a readable semifer checkpoint"):
            semifer.train(cfg)
    assert not target.exists(), "the pickle payload ran"


# ------------------------------------------------------------------------ prepare and predict

@pytest.fixture()
def media_folder(tmp_path):
    """One good photo, its odd-mode and broken variants, a non-UTF-8 name and symlink loops."""
    pytest.importorskip("dlib")
    pytest.importorskip("cv2")
    from tests.media_helpers import astronaut

    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    face = Image.fromarray(astronaut(128))
    face.save(d / "good.jpg")
    for kind in KINDS:
        (d / "sub" / f"{kind}.png").write_bytes(bad_variant(kind, face))
    _loop_and_non_utf8(d / "sub", face)
    return d


@pytest.mark.parametrize("command", ["prepare", "predict"])
def test_prepare_and_predict_survive_every_bad_file(media_folder, tmp_path, command, capsys):
    from semifer.cli import main

    out = tmp_path / "out"
    if command == "prepare":
        assert main(["prepare", str(media_folder), "--out", str(out)]) == 0    # progress on: prints paths
        with open(out / "sources.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
            done = [line.split(",")[0] for line in f.read().splitlines()[1:]]
    else:
        run = tmp_path / "run"
        _tiny_checkpoint(run)
        assert main(["predict", str(run), str(media_folder), "--out", str(out)]) == 0
        with open(out / "predictions.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
            done = sorted({line.split(",")[0] for line in f.read().splitlines()[1:]})
    names = sorted(Path(p).name for p in done)
    decodable = sorted(["good.jpg", NON_UTF8] + [f"{k}.png" for k in KINDS if k not in REASON])
    assert names == decodable                        # each once: the symlink loops were not followed
    printed = capsys.readouterr().out
    assert f"skipped {len(REASON)}" in printed       # the unusable ones are counted, not fatal


def _tiny_checkpoint(run: Path) -> None:
    """A run directory holding an untrained small model (predict needs a checkpoint, not a good one)."""
    from semifer.config import load_config, to_dict
    from semifer.engine.checkpoint import atomic_save
    from semifer.labels import ABAW_LABELS
    from semifer.models import build_model

    cfg = load_config(base={"data": {"image_size": 32}, "model": {"backbone": "small_cnn",
                                                                  "backbone_args": {"width": 8}}})
    model = build_model(cfg.model, len(ABAW_LABELS), in_chans=3)
    atomic_save({"model": model.state_dict(), "step": 0, "config": to_dict(cfg), "labels": list(ABAW_LABELS)},
                run / "checkpoints" / "best.pt")
