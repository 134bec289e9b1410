"""Readers for labeled facial-expression data sets on disk: ``FORMAT:PATH[?options]`` -> :class:`ImageSet`.

Each reader turns its layout into *records* ``(source, label, where, box)`` and hands
them to :func:`decode_records`, which decodes them with a small thread pool (PIL
releases the GIL) through :func:`semifer.data.decode.decode_image`. Unusable images
are skipped and counted by reason (``ImageSet.skipped``); malformed annotation files
are errors (``ValueError`` naming the file and line). Class names map to the ABAW
order by name (:mod:`semifer.labels`); no reader hard-codes an ABAW index.

See ``docs/data_formats.md`` for every format's layout, options and policies.
"""
from __future__ import annotations

import csv
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from semifer.data.decode import SkipCounter, _to_8bit, decode_image, open_checked
from semifer.data.imageset import ImageSet
from semifer.labels import ABAW_LABELS, canonical_name, label_index
from semifer.registry import FORMATS

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
PROGRESS_MIN_RECORDS = 2000

Box = tuple[float, float, float, float]
Record = tuple[Any, int, str, "Box | None"]          # (source, label or -1, where, box)
Face = tuple[int, str, "Box | None"]                 # (label or -1, where, box)
Group = tuple[Any, Sequence[Face]]                   # one source image, one or more faces


# ----------------------------------------------------------------------------------------------
# Shared decoding
# ----------------------------------------------------------------------------------------------

def _workers() -> int:
    return max(2, min(4, os.cpu_count() or 2))


def _open_full(source: Any) -> tuple[np.ndarray | None, str | None]:
    """Decode a whole image once (for several face crops) to a uint8 L/RGB array, or (None, reason)."""
    if isinstance(source, np.ndarray):
        return source, None
    try:
        raw = source if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
    except FileNotFoundError:
        return None, "missing file"
    except OSError:
        return None, "unreadable file"
    if len(raw) == 0:
        return None, "empty file"
    try:
        import io

        img = open_checked(io.BytesIO(raw))
        img.load()
        return np.asarray(_to_8bit(img), dtype=np.uint8), None
    except Exception:  # classify the failure exactly as decode_image does
        _, reason = decode_image(raw, 8, 1)
        return None, reason or "corrupt image"


def _decode_group(source: Any, faces: Sequence[Face], size: int, channels: int) -> list[tuple[np.ndarray | None, str | None]]:
    if len(faces) == 1:
        return [decode_image(source, size, channels, faces[0][2])]
    full, reason = _open_full(source)  # read and decode the source once, crop per face
    if full is None:
        return [(None, reason)] * len(faces)
    return [decode_image(full, size, channels, box) for _, _, box in faces]


def decode_groups(groups: Iterable[Group], cfg: Any, counter: SkipCounter | None = None, *, name: str = "",
                  total: int | None = None, desc: str | None = None) -> tuple[ImageSet, list[str]]:
    """Decode ``(source, [(label, where, box), ...])`` groups into one :class:`ImageSet`.

    Sources are decoded in order by a thread pool with a bounded number of jobs in flight,
    so only a few encoded files are held at a time. Returns the set and the ``where`` of
    every kept sample (parallel to the set's rows).
    """
    counter = counter if counter is not None else SkipCounter()
    size, channels = int(cfg.image_size), int(cfg.channels)
    if total is None and hasattr(groups, "__len__"):
        total = sum(len(faces) for _, faces in groups)  # type: ignore[arg-type]
    bar = None
    if total is not None and total > PROGRESS_MIN_RECORDS:
        try:
            from tqdm import tqdm
            bar = tqdm(total=total, desc=desc or name or "decoding", unit="img", file=sys.stderr, leave=False)
        except ImportError:  # pragma: no cover
            bar = None
    # With a known total, decoded rows go straight into one preallocated array (no list + stack copy).
    out = np.empty((total, channels, size, size), dtype=np.uint8) if total is not None else None
    images: list[np.ndarray] = []
    labels: list[int] = []
    kept: list[str] = []

    def collect(faces: Sequence[Face], results: list) -> None:
        for (label, where, _), (arr, reason) in zip(faces, results):
            if arr is None:
                counter.add(reason or "corrupt image", where)
                continue
            if out is not None and len(labels) < len(out):
                out[len(labels)] = arr
            else:
                images.append(arr)
            labels.append(int(label))
            kept.append(where)
        if bar is not None:
            bar.update(len(faces))

    window = 8 * _workers()
    pending: deque = deque()
    try:
        with ThreadPoolExecutor(max_workers=_workers(), thread_name_prefix="semifer-decode") as pool:
            for source, faces in groups:
                pending.append((faces, pool.submit(_decode_group, source, faces, size, channels)))
                if len(pending) >= window:
                    f, fut = pending.popleft()
                    collect(f, fut.result())
            while pending:
                f, fut = pending.popleft()
                collect(f, fut.result())
    finally:
        for _, fut in pending:
            fut.cancel()
        if bar is not None:
            bar.close()
    if out is not None:
        n_pre = min(len(labels), len(out))
        arr = out if n_pre == len(out) else out[:n_pre].copy()  # copy only when some rows were skipped
        if images:  # more rows than announced (a wrong ``total``): append them
            arr = np.concatenate([arr, np.stack(images)])
        x = torch.from_numpy(arr)
    elif images:
        x = torch.from_numpy(np.stack(images))
    else:
        x = torch.zeros((0, channels, size, size), dtype=torch.uint8)
    y = torch.tensor(labels, dtype=torch.int64)
    return ImageSet(x, y, name=name, skipped=counter.as_dict()), kept


def decode_records(records: Iterable[Record], cfg: Any, counter: SkipCounter | None = None, *, name: str = "",
                   total: int | None = None, desc: str | None = None) -> tuple[ImageSet, list[str]]:
    """Decode ``(source, label, where, box)`` records (source: path, bytes or uint8 array)."""
    if total is None and hasattr(records, "__len__"):
        total = len(records)  # type: ignore[arg-type]
    groups = ((src, ((label, where, box),)) for src, label, where, box in records)
    return decode_groups(groups, cfg, counter, name=name, total=total, desc=desc)


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------

def _bad(file: Path | str, line: int, msg: str) -> ValueError:
    return ValueError(f"{file}:{line}: {msg}")


def _csv_with_header(fh, file: Path, required: tuple[str, ...], expected: str):
    """A csv reader past the header, and the lower-cased column names; errors name FILE:1."""
    reader = csv.reader(fh)
    header = next(reader, None)
    if header is None:
        raise _bad(file, 1, f"empty file (expected a header with {expected})")
    cols = [h.strip().lower() for h in header]
    if any(c not in cols for c in required):
        raise _bad(file, 1, f"header must name {expected}, got {header}")
    return reader, cols


def _rows(reader, file: Path, cols: list[str]):
    """(line number, row) for each non-blank row; a row with the wrong column count is an error."""
    for row in reader:
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(cols):
            raise _bad(file, reader.line_num, f"expected {len(cols)} columns ({','.join(cols)}), got {len(row)}")
        yield reader.line_num, row


def _choice(option: str, value: str, allowed: dict[str, str]) -> str:
    key = value.strip().lower()
    if key not in allowed:
        raise ValueError(f"option {option}={value!r}: choose one of {sorted(set(allowed))}")
    return allowed[key]


def _inside(base: Path, rel: str) -> Path | None:
    """``base/rel`` if it stays inside ``base`` (lexically; ``..`` and foreign absolute paths escape)."""
    p = Path(rel)
    full = p if p.is_absolute() else base / p
    b = os.path.normpath(os.path.abspath(base))
    f = os.path.normpath(os.path.abspath(full))
    if f != b and not f.startswith(b.rstrip(os.sep) + os.sep):
        return None
    return Path(f)


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    return path


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} {path} does not exist or is not a folder")
    return path


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS


def _known_names() -> str:
    return ", ".join(sorted({n.lower() for n in ABAW_LABELS} | {"angry", "happy", "sad", "contempt"}))


# ----------------------------------------------------------------------------------------------
# folder
# ----------------------------------------------------------------------------------------------

@FORMATS.register("folder")
def folder(path: str, cfg: Any, classes: str = "") -> ImageSet:
    """One subfolder per class (angry/, happy/, ...), images found recursively; ?classes=a,b restricts."""
    root = _require_dir(Path(path), "image folder")
    counter = SkipCounter()
    try:
        wanted = {canonical_name(c) for c in classes.split(",") if c.strip()} if classes else None
    except KeyError as e:
        raise ValueError(f"folder option classes={classes!r}: {e.args[0]}") from None
    records: list[Record] = []
    for d in sorted(root.iterdir(), key=lambda p: p.name):
        if d.name.startswith("."):
            continue
        if not d.is_dir():
            if _is_image(d):
                counter.add("image outside a class folder", str(d))
            continue
        try:
            cname = canonical_name(d.name)
        except KeyError:
            raise ValueError(f"{root}: class folder {d.name!r} is not a known expression; "
                             f"known names (case-insensitive): {_known_names()}") from None
        if wanted is not None and cname not in wanted:
            continue
        y = label_index(cname)
        files = sorted((p for p in d.rglob("*") if _is_image(p) and p.is_file()
                        and not any(part.startswith(".") for part in p.relative_to(d).parts)),
                       key=lambda p: p.relative_to(d).as_posix())
        records.extend((p, y, str(p), None) for p in files)
    data, _ = decode_records(records, cfg, counter, name=f"folder:{path}")
    return data


@FORMATS.register("images")
def images(path: str, cfg: Any) -> ImageSet:
    """A folder of face images with no labels (recursive), loaded into memory as unlabeled data."""
    root = _require_dir(Path(path), "image folder")
    files = sorted((p for p in root.rglob("*") if _is_image(p) and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(root).parts)),
                   key=lambda p: p.relative_to(root).as_posix())
    data, _ = decode_records(((p, -1, str(p), None) for p in files), cfg, SkipCounter(),
                             name=f"images:{path}", total=len(files))
    return data


# ----------------------------------------------------------------------------------------------
# csv manifest
# ----------------------------------------------------------------------------------------------

@FORMATS.register("csv")
def csv_manifest(path: str, cfg: Any, split: str | None = None, root: str | None = None) -> ImageSet:
    """Manifest CSV with header path,label[,split]; ?split=NAME keeps one split, ?root=DIR sets the base."""
    manifest = _require_file(Path(path), "manifest")
    base = Path(root) if root else manifest.parent
    counter = SkipCounter()
    records: list[Record] = []
    with open(manifest, newline="", encoding="utf-8-sig") as fh:
        reader, cols = _csv_with_header(fh, manifest, ("path", "label"), "columns path,label[,split]")
        ip, il = cols.index("path"), cols.index("label")
        isplit = cols.index("split") if "split" in cols else None
        if split is not None and isplit is None:
            raise ValueError(f"{manifest}: option split={split!r} given but the manifest has no split column")
        for line, row in _rows(reader, manifest, cols):
            if split is not None and row[isplit].strip() != split:
                continue
            rel, lab = row[ip].strip(), row[il].strip()
            if not rel:
                raise _bad(manifest, line, "empty path")
            if lab:
                try:
                    y = label_index(lab)
                except KeyError:
                    raise _bad(manifest, line, f"unknown label {lab!r}; known: {_known_names()}") from None
            else:
                y = -1
            full = _inside(base, rel)
            if full is None:
                counter.add("path outside data root", f"{manifest}:{line}")
                continue
            records.append((full, y, f"{manifest}:{line}", None))
    data, _ = decode_records(records, cfg, counter, name=f"csv:{path}")
    return data


# ----------------------------------------------------------------------------------------------
# FER2013
# ----------------------------------------------------------------------------------------------

FER2013_CLASSES = ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")
_FER_SPLITS = {"training": "Training", "train": "Training",
               "publictest": "PublicTest", "val": "PublicTest", "valid": "PublicTest", "validation": "PublicTest",
               "privatetest": "PrivateTest", "test": "PrivateTest"}


@FORMATS.register("fer2013")
def fer2013(path: str, cfg: Any, split: str | None = None) -> ImageSet:
    """Kaggle fer2013.csv (emotion,pixels,Usage; 48x48 grey); ?split=Training|PublicTest|PrivateTest."""
    file = _require_file(Path(path), "FER2013 csv")
    usage = _choice("split", split, _FER_SPLITS) if split is not None else None
    lut = [label_index(c) for c in FER2013_CLASSES]

    def rows() -> Iterator[Record]:
        with open(file, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise _bad(file, 1, "empty file (expected header emotion,pixels,Usage)")
            cols = [h.strip().lower() for h in header]
            if "pixels" not in cols:
                raise _bad(file, 1, f"header must contain 'pixels' (emotion,pixels,Usage), got {header}")
            ipx = cols.index("pixels")
            iem = cols.index("emotion") if "emotion" in cols else None
            ius = cols.index("usage") if "usage" in cols else None
            if usage is not None and ius is None:
                raise ValueError(f"{file}: option split={split!r} given but the file has no Usage column")
            for line, row in _rows(reader, file, cols):
                if usage is not None and row[ius].strip() != usage:
                    continue
                y = -1
                if iem is not None:
                    e = row[iem].strip()
                    if not (e.isdigit() and int(e) < len(lut)):
                        raise _bad(file, line, f"emotion {e!r} is not an integer 0..{len(lut) - 1}")
                    y = lut[int(e)]
                try:
                    px = np.array(row[ipx].split(), dtype=np.int64)
                except ValueError:
                    raise _bad(file, line, "pixels must be space-separated integers") from None
                if px.size != 48 * 48:
                    raise _bad(file, line, f"expected 2304 pixels (48x48), got {px.size}")
                if px.min() < 0 or px.max() > 255:
                    raise _bad(file, line, "pixel values must be 0..255")
                yield px.astype(np.uint8).reshape(48, 48), y, f"{file}:{line}", None

    data, _ = decode_records(rows(), cfg, name=f"fer2013:{path}")
    return data


# ----------------------------------------------------------------------------------------------
# RAF-DB (basic)
# ----------------------------------------------------------------------------------------------

RAFDB_CLASSES = ("Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral")  # labels 1..7


@FORMATS.register("rafdb")
def rafdb(path: str, cfg: Any, split: str | None = None) -> ImageSet:
    """RAF-DB basic: EmoLabel/list_patition_label.txt + Image/aligned/*_aligned.jpg; ?split=train|test."""
    root = _require_dir(Path(path), "RAF-DB root")
    lst = _require_file(root / "EmoLabel" / "list_patition_label.txt", "RAF-DB label list")
    prefix = _choice("split", split, {"train": "train_", "training": "train_", "test": "test_"}) if split else None
    lut = [label_index(c) for c in RAFDB_CLASSES]
    aligned, original = root / "Image" / "aligned", root / "Image" / "original"
    records: list[Record] = []
    with open(lst, encoding="utf-8") as fh:
        for line, text in enumerate(fh, 1):
            parts = text.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise _bad(lst, line, f"expected 'name label', got {text.strip()!r}")
            name, lab = parts
            if not (lab.isdigit() and 1 <= int(lab) <= len(lut)):
                raise _bad(lst, line, f"label {lab!r} is not an integer 1..{len(lut)}")
            if "/" in name or "\\" in name or name.startswith("."):
                raise _bad(lst, line, f"image name {name!r} must be a plain file name")
            if prefix is not None and not name.startswith(prefix):
                continue
            stem, ext = os.path.splitext(name)
            candidates = (aligned / f"{stem}_aligned{ext}", aligned / name, original / name)
            img = next((c for c in candidates if c.is_file()), candidates[0])
            records.append((img, lut[int(lab) - 1], f"{lst}:{line} ({name})", None))
    data, _ = decode_records(records, cfg, name=f"rafdb:{path}")
    return data


# ----------------------------------------------------------------------------------------------
# AffectNet
# ----------------------------------------------------------------------------------------------

# Expression codes 0..8 by name; 9 Uncertain and 10 Non-Face are always dropped.
AFFECTNET_CLASSES = ("Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger", "Contempt", "None")
AFFECTNET_DROPPED = {9: "Uncertain", 10: "Non-Face"}


@FORMATS.register("affectnet")
def affectnet(path: str, cfg: Any, root: str | None = None, contempt: str = "other", none: str = "other",
              crop: str = "1") -> ImageSet:
    """AffectNet manual-annotation CSV; contempt/none -> Other (?contempt=drop, ?none=drop), 9/10 dropped."""
    file = _require_file(Path(path), "AffectNet csv")
    policy = {"other": "other", "drop": "drop"}
    keep_contempt = _choice("contempt", contempt, policy) == "other"
    keep_none = _choice("none", none, policy) == "other"
    use_box = _choice("crop", crop, {"1": "1", "true": "1", "yes": "1", "0": "0", "false": "0", "no": "0"}) == "1"
    # Map by name: Contempt is an alias of Other in semifer.labels; "None" (another expression) is Other.
    lut: dict[int, int | None] = {}
    for code, cname in enumerate(AFFECTNET_CLASSES):
        if cname == "Contempt":
            lut[code] = label_index("contempt") if keep_contempt else None
        elif cname == "None":
            lut[code] = label_index("Other") if keep_none else None
        else:
            lut[code] = label_index(cname)
    for code in AFFECTNET_DROPPED:
        lut[code] = None
    base = Path(root) if root else file.parent
    bases = [base, base / "Manually_Annotated_Images"]
    counter = SkipCounter()
    records: list[Record] = []
    with open(file, newline="", encoding="utf-8-sig") as fh:
        reader, cols = _csv_with_header(fh, file, ("subdirectory_filepath", "expression"),
                                        "subDirectory_filePath and expression (the AffectNet header)")
        ip, ie = cols.index("subdirectory_filepath"), cols.index("expression")
        ibox = [cols.index(c) if c in cols else None for c in ("face_x", "face_y", "face_width", "face_height")]
        last_good = 0
        for line, row in _rows(reader, file, cols):
            e = row[ie].strip()
            if not (e.isdigit() and int(e) in lut):
                raise _bad(file, line, f"expression {e!r} is not an integer 0..10")
            where = f"{file}:{line}"
            y = lut[int(e)]
            if y is None:
                counter.add("dropped label", where)
                continue
            rel = row[ip].strip()
            if not rel:
                raise _bad(file, line, "empty subDirectory_filePath")
            order = [last_good] + [i for i in range(len(bases)) if i != last_good]
            full = None
            for i in order:
                cand = _inside(bases[i], rel)
                if cand is not None and cand.is_file():
                    full, last_good = cand, i
                    break
            if full is None:
                full = _inside(bases[0], rel)
                if full is None:
                    counter.add("path outside data root", where)
                    continue
            box = None
            if use_box and all(i is not None for i in ibox):
                try:
                    x, yy, w, h = (float(row[i]) for i in ibox)  # type: ignore[index]
                    if x >= 0 and yy >= 0 and w >= 2 and h >= 2 and np.isfinite([x, yy, w, h]).all():
                        box = (x, yy, x + w, yy + h)
                except ValueError:
                    box = None
            records.append((full, y, where, box))
    data, _ = decode_records(records, cfg, counter, name=f"affectnet:{path}")
    return data


# ----------------------------------------------------------------------------------------------
# ExpW
# ----------------------------------------------------------------------------------------------

EXPW_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")  # labels 0..6


@FORMATS.register("expw")
def expw(path: str, cfg: Any, images: str | None = None, min_confidence: str = "") -> ImageSet:
    """ExpW: label/label.lst (name face_id top left right bottom confidence label) + image/origin/; faces cropped."""
    root = _require_dir(Path(path), "ExpW root")
    lst = next((p for p in (root / "label" / "label.lst", root / "label.lst") if p.is_file()), None)
    if lst is None:
        raise FileNotFoundError(f"ExpW label list not found: looked for {root / 'label' / 'label.lst'} and {root / 'label.lst'}")
    if images:
        img_dir = _require_dir(Path(images), "ExpW image folder")
    else:
        img_dir = next((p for p in (root / "image" / "origin", root / "origin") if p.is_dir()), None)
        if img_dir is None:
            raise FileNotFoundError(f"ExpW images not found: looked for {root / 'image' / 'origin'} and {root / 'origin'}")
    try:
        min_conf = float(min_confidence) if min_confidence else None
    except ValueError:
        raise ValueError(f"option min_confidence={min_confidence!r} must be a number") from None
    lut = [label_index(c) for c in EXPW_CLASSES]
    counter = SkipCounter()
    faces: dict[str, list[Face]] = {}  # image name -> faces, in first-appearance order
    with open(lst, encoding="utf-8") as fh:
        for line, text in enumerate(fh, 1):
            parts = text.split()
            if not parts:
                continue
            if len(parts) != 8:
                raise _bad(lst, line, f"expected 8 fields (image_name face_id top left right bottom confidence label), got {len(parts)}")
            name = parts[0]
            try:
                top, left, right, bottom = (float(v) for v in parts[2:6])
                conf = float(parts[6])
                lab = int(parts[7])
            except ValueError:
                raise _bad(lst, line, f"non-numeric box, confidence or label in {text.strip()!r}") from None
            if not 0 <= lab < len(lut):
                raise _bad(lst, line, f"label {lab} is not 0..{len(lut) - 1}")
            where = f"{lst}:{line}"
            if min_conf is not None and conf < min_conf:
                counter.add("low face confidence", where)
                continue
            faces.setdefault(name, []).append((lut[lab], where, (left, top, right, bottom)))
    groups: list[Group] = []
    for name, fs in faces.items():
        full = _inside(img_dir, name)
        if full is None:
            for _, where, _ in fs:
                counter.add("path outside data root", where)
            continue
        groups.append((full, fs))
    data, _ = decode_groups(groups, cfg, counter, name=f"expw:{path}")
    return data


# ----------------------------------------------------------------------------------------------
# Aff-Wild2 (ABAW EXPR)
# ----------------------------------------------------------------------------------------------

AFFWILD2_HEADER = "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other"
AFFWILD2_SPLITS = {"train": "Train_Set", "train_set": "Train_Set", "training": "Train_Set",
                   "val": "Validation_Set", "validation": "Validation_Set", "validation_set": "Validation_Set"}


def _affwild2_ann_dirs(root: Path, split: str | None, annotations: str | None) -> list[Path]:
    """Annotation folders (one per split) for ``split`` (canonical name) or every split found."""
    splits = [split] if split else ["Train_Set", "Validation_Set"]
    bases = [Path(annotations)] if annotations else [root / "annotations" / "EXPR_Classification_Challenge", root]
    out = []
    for s in splits:
        cands = [b / s for b in bases] + ([Path(annotations)] if annotations and split else [])
        found = next((c for c in cands if c.is_dir()), None)
        if found is not None:
            out.append(found)
        elif split:
            raise FileNotFoundError(f"Aff-Wild2 annotations for {s} not found; looked in {', '.join(map(str, cands))}")
    if not out:
        raise FileNotFoundError(f"no Aff-Wild2 annotation folders (Train_Set/Validation_Set) under {', '.join(map(str, bases))}")
    return out


def _split_name(split: str | None) -> str | None:
    return _choice("split", split, AFFWILD2_SPLITS) if split else None


def affwild2_videos(root: str | Path, split: str | None = None, annotations: str | None = None) -> list[str]:
    """Sorted video names that have EXPR annotations in ``split`` (Train_Set/Validation_Set, aliases train/val)."""
    dirs = _affwild2_ann_dirs(Path(root), _split_name(split), annotations)
    return sorted({p.stem for d in dirs for p in d.glob("*.txt")})


def read_affwild2_annotation(file: Path) -> list[int]:
    """Per-frame ABAW labels (-1 = not annotated) of one EXPR file; frame i (1-based) is line i+1."""
    header_names = AFFWILD2_HEADER.split(",")
    lut = [label_index(n) for n in header_names]
    out: list[int] = []
    with open(file, encoding="utf-8-sig") as fh:
        lines = fh.read().splitlines()
    if not lines or lines[0].strip() != AFFWILD2_HEADER:
        got = lines[0].strip() if lines else ""
        raise _bad(file, 1, f"header must be exactly {AFFWILD2_HEADER!r}, got {got!r}")
    while len(lines) > 1 and not lines[-1].strip():
        lines.pop()  # trailing blank lines
    for line, text in enumerate(lines[1:], 2):
        t = text.strip()
        try:
            v = int(t)
        except ValueError:
            raise _bad(file, line, f"expected an integer label -1..7, got {t!r}") from None
        if not -1 <= v <= 7:
            raise _bad(file, line, f"label {v} is outside -1..7")
        out.append(lut[v] if v >= 0 else -1)
    return out


@FORMATS.register("affwild2")
def affwild2(path: str, cfg: Any, split: str | None = None, videos: str = "", labeled: str = "1",
             annotations: str | None = None, frames: str | None = None, step: str = "1") -> ImageSet:
    """Aff-Wild2 ABAW EXPR: per-video frame labels + cropped_aligned/<video>/%05d.jpg; ?split=, ?labeled=1|0|all."""
    root = Path(path)
    s = _split_name(split)
    mode = _choice("labeled", labeled, {"1": "1", "true": "1", "yes": "1", "0": "0", "false": "0", "no": "0",
                                        "all": "all"})
    try:
        every = int(step)
        if every < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"option step={step!r} must be a positive integer") from None
    frame_dir = _require_dir(Path(frames) if frames else root / "cropped_aligned", "Aff-Wild2 frame folder")
    files: dict[str, Path] = {}
    for d in _affwild2_ann_dirs(root, s, annotations):
        for p in sorted(d.glob("*.txt")):
            files.setdefault(p.stem, p)
    if videos:
        wanted = [v.strip() for v in videos.split(",") if v.strip()]
        missing = [v for v in wanted if v not in files]
        if missing:
            raise ValueError(f"affwild2: videos {missing} have no annotation file in split {s or 'any'}")
        files = {v: files[v] for v in wanted}
    counter = SkipCounter()
    records: list[Record] = []
    meta: list[tuple[str, int]] = []
    for video in sorted(files):
        labels = read_affwild2_annotation(files[video])
        vdir = frame_dir / video
        present = set(os.listdir(vdir)) if vdir.is_dir() else set()
        for i, y in enumerate(labels, 1):
            if (i - 1) % every:
                continue
            if (mode == "1" and y < 0) or (mode == "0" and y >= 0):
                continue
            fname = f"{i:05d}.jpg"
            where = f"{video}/{fname}"
            if fname not in present:
                counter.add("missing frame", where)
                continue
            records.append((vdir / fname, y if mode != "0" else -1, where, None))
    data, kept = decode_records(records, cfg, counter, name=f"affwild2:{path}")
    # (video, frame) of every row, for ABAW prediction writers; load_source does not carry it over.
    data.frames = [(w.rsplit("/", 1)[0], int(w.rsplit("/", 1)[1][:-4])) for w in kept]
    return data

