"""``semifer prepare``: detect, align and crop every face of images, folders and videos.

Output folder::

    OUT/crops/<source>_<hash>/<frame>_<face>.<ext>   aligned crops (ArcFace 112x112 frame)
    OUT/manifest.csv                                  one row per face (MANIFEST_COLUMNS)
    OUT/sources.csv                                   one row per finished source (the resume ledger)
    OUT/prepare.json                                  settings; a re-run with other settings is refused

Sources are processed in a worker pool, one source per task. The main process appends a
finished source's manifest rows in one write, fsyncs, then appends its ledger row; a
re-run skips sources whose ledger row matches the file (path, size, mtime) and drops
manifest rows of unfinished ones, so a kill at any point loses at most the sources in flight.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from semifer.data.decode import SkipCounter
from semifer.faces.align import CROP_SIZE, crop_face
from semifer.faces.detectors import build_detector
from semifer.faces.media import Media, MediaError, expand_inputs, iter_frames

MANIFEST_COLUMNS = (["source", "frame", "timestamp", "face", "crop", "score", "x1", "y1", "x2", "y2"]
                    + [f"lm{i}_{a}" for i in range(5) for a in "xy"] + ["scheme"])
LEDGER_COLUMNS = ["source", "key", "kind", "frames", "faces"]


@dataclass
class PrepareReport:
    """What one ``prepare`` call did."""

    out: Path
    sources_done: int = 0
    sources_already_done: int = 0
    frames: int = 0
    faces: int = 0
    seconds: float = 0.0
    skips: SkipCounter = field(default_factory=SkipCounter)

    def summary(self) -> str:
        rate = self.frames / self.seconds if self.seconds > 0 else 0.0
        return (f"prepared {self.sources_done} sources ({self.sources_already_done} already done): "
                f"{self.frames} frames, {self.faces} faces in {self.seconds:.1f} s ({rate:.1f} frames/s); "
                f"{self.skips.summary()}; manifest {self.out / 'manifest.csv'}")


def source_key(media: Media) -> str:
    """Identity of a source's content for resuming: a changed file is done again."""
    if media.kind == "camera":
        return media.path
    st = os.stat(media.path)
    return f"{st.st_size}:{st.st_mtime_ns}"


def _crop_dir(media: Media) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(media.path).stem)[:60] or "source"
    return f"{stem}_{hashlib.sha1(os.fsencode(media.path)).hexdigest()[:8]}"


def _atomic_image(arr: np.ndarray, path: Path, quality: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    Image.fromarray(arr).save(tmp, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    os.replace(tmp, path)


def process_source(media: Media, detector, out: Path, every: int = 1, ext: str = "jpg", quality: int = 95,
                   size: int = CROP_SIZE, min_score: float | None = None,
                   max_frames: int | None = None, frame: str = "arcface112") -> tuple[list[list], int, str | None]:
    """Detect, align and write the crops of one source -> (manifest rows, frames, skip reason or None)."""
    rows: list[list] = []
    frames = 0
    sub = _crop_dir(media)
    try:
        for index, ts, rgb in iter_frames(media, every=every, max_frames=max_frames):
            frames += 1
            faces = [f for f in detector(rgb) if min_score is None or f.score >= min_score]
            for k, face in enumerate(faces):
                rel = f"crops/{sub}/{index:06d}_{k}.{ext}"
                (out / "crops" / sub).mkdir(parents=True, exist_ok=True)
                _atomic_image(crop_face(rgb, face, size, frame), out / rel, quality)
                rows.append([media.path, index, f"{ts:.3f}", k, rel, f"{face.score:.4f}",
                             *(f"{v:.1f}" for v in face.box), *(f"{v:.2f}" for v in face.landmarks.ravel()),
                             face.scheme])
    except MediaError as e:
        return [], frames, str(e)
    except Exception as e:  # noqa: BLE001 - one bad source must not end the run
        return [], frames, f"{type(e).__name__} while processing"
    return rows, frames, None


_WORKER: dict = {}


def _worker_init(detector: str, options: dict) -> None:
    _WORKER["detector"] = build_detector(detector, **options)


def _worker_task(media: Media, out: str, kw: dict):
    return process_source(media, _WORKER["detector"], Path(out), **kw)


def _csv_text(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _append(path: Path, text: str) -> None:
    """One write of whole lines with O_APPEND, then fsync: a crash leaves at most a torn last line."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, text.encode("utf-8", "surrogateescape"))  # non-UTF-8 file names kept byte-exact
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_complete_rows(path: Path, ncols: int) -> list[list[str]]:
    """Rows (header excluded) of a CSV we appended to, without a torn last line."""
    if not path.is_file():
        return []
    text = path.read_text("utf-8", "surrogateescape")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    rows = list(csv.reader(io.StringIO(text)))
    return [r for r in rows[1:] if len(r) == ncols]


def _rewrite(path: Path, header: list[str], rows: list[list]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        f.write(_csv_text([header, *rows]))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepared_frame(spec: str) -> str | None:
    """The face frame of crops written by ``semifer prepare``, from the ``prepare.json`` beside
    or above a source (``FORMAT:PATH``: the folder, ``crops/`` in it, or its manifest); None
    when the source was not made by ``prepare``."""
    rest = spec
    while ":" in rest and not Path(rest).exists() and rest.partition(":")[0].isalpha():
        rest = rest.partition(":")[2]   # FORMAT: prefixes (stream:folder:PATH)
    path = Path(rest)
    for folder in (path, path.parent, path.parent.parent):
        p = folder / "prepare.json"
        if p.is_file():
            try:
                return json.loads(p.read_text()).get("frame", "arcface112")
            except (OSError, ValueError):
                return None
    return None


def check_frame(spec: str, frame: str, key: str) -> None:
    """Refuse crops that ``prepare`` cut in another face frame than ``frame`` (the model's)."""
    cut = prepared_frame(spec)
    if cut is not None and cut != frame:
        raise ValueError(f"{spec} holds crops cut in face frame {cut!r} (its prepare.json), but {key} is {frame!r}: "
                         f"set {key}={cut}, or prepare the faces again with --frame {frame}")


def _check_settings(out: Path, settings: dict) -> None:
    p = out / "prepare.json"
    if p.is_file():
        old = json.loads(p.read_text())
        if old != settings:
            diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
            raise ValueError(f"{out} was prepared with other settings {diff}; use another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".prepare.json.tmp"
    tmp.write_text(json.dumps(settings, indent=2))
    os.replace(tmp, p)


def prepare(inputs: list[str], out: Path | str, detector: str = "dlib", detector_options: dict | None = None,
            workers: int = 1, every: int = 1, ext: str = "jpg", quality: int = 95, size: int = CROP_SIZE,
            min_score: float | None = None, max_frames: int | None = None, progress: bool = True,
            frame: str = "arcface112") -> PrepareReport:
    """Detect and align the faces of ``inputs`` into ``out`` (resumable; see module doc).

    ``frame``: where the crops put the face (faces/align.py ``FRAMES``); crops for a model
    trained in another frame (e.g. the bundled FER2013 model) are cut in its frame."""
    out = Path(out)
    if every < 1:
        raise ValueError("every must be >= 1")
    if ext not in ("jpg", "png"):
        raise ValueError(f"crop format must be jpg or png, got {ext!r}")
    if detector == "whole":  # it finds no faces, it declares the image one: nothing to crop or align
        raise ValueError("semifer prepare needs a face detector (dlib, scrfd); 'whole' treats every image as an "
                         "already-aligned face, so use the images as they are (predict --detector whole)")
    options = dict(detector_options or {})
    from semifer.faces.align import FRAMES

    if frame not in FRAMES:
        raise ValueError(f"unknown face frame {frame!r}; known: {sorted(FRAMES)}")
    det = build_detector(detector, **options)  # fails here, with a clear message, not in every worker
    _check_settings(out, {"detector": detector, "options": options, "every": every, "ext": ext,
                          "size": size, "min_score": min_score, "max_frames": max_frames,
                          # the default frame is left out, so folders prepared before frames existed resume
                          **({"frame": frame} if frame != "arcface112" else {})})
    report = PrepareReport(out)
    t0 = time.perf_counter()
    media = expand_inputs(inputs, report.skips)

    manifest, ledger = out / "manifest.csv", out / "sources.csv"
    done = {r[0]: r for r in _read_complete_rows(ledger, len(LEDGER_COLUMNS))}
    todo = []
    for m in media:
        try:
            key = source_key(m)
        except OSError:
            report.skips.add("missing file", m.path)
            continue
        if m.path in done and done[m.path][1] == key:
            report.sources_already_done += 1
        else:
            todo.append((m, key))
    # Keep only rows of finished sources that stay finished: drops torn lines and rows of
    # sources killed between the manifest and ledger appends, or changed since.
    redo = {m.path for m, _ in todo}
    keep_ledger = [r for p, r in done.items() if p not in redo]
    finished = {r[0] for r in keep_ledger}
    old_rows = _read_complete_rows(manifest, len(MANIFEST_COLUMNS))
    keep_rows = [r for r in old_rows if r[0] in finished]
    if not manifest.is_file() or len(keep_rows) != len(old_rows) or manifest.read_text("utf-8", "surrogateescape").count("\n") != len(old_rows) + 1:
        _rewrite(manifest, MANIFEST_COLUMNS, keep_rows)
    if not ledger.is_file() or len(keep_ledger) != len(done) or ledger.read_text("utf-8", "surrogateescape").count("\n") != len(done) + 1:
        _rewrite(ledger, LEDGER_COLUMNS, keep_ledger)

    kw = {"every": every, "ext": ext, "quality": quality, "size": size, "min_score": min_score,
          "max_frames": max_frames, "frame": frame}

    def record(m: Media, key: str, result) -> None:
        rows, frames, reason = result
        if reason is not None:
            report.skips.add(reason, m.path)
            return
        if rows:
            _append(manifest, _csv_text(rows))
        _append(ledger, _csv_text([[m.path, key, m.kind, frames, len(rows)]]))
        report.sources_done += 1
        report.frames += frames
        report.faces += len(rows)
        if progress:
            print(f"  {m.path}: {frames} frames, {len(rows)} faces", flush=True)

    if workers <= 1 or len(todo) <= 1:
        for m, key in todo:
            record(m, key, process_source(m, det, out, **kw))
    else:
        # spawn, not fork: the parent may hold torch/OpenMP threads that a forked child would inherit broken.
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=get_context("spawn"),
                                 initializer=_worker_init, initargs=(detector, options)) as pool:
            futures = {pool.submit(_worker_task, m, str(out), kw): (m, key) for m, key in todo}
            for fut in as_completed(futures):
                m, key = futures[fut]
                try:
                    result = fut.result()
                except Exception as e:  # noqa: BLE001 - a dead worker skips its source, not the run
                    result = ([], 0, f"worker failed ({type(e).__name__})")
                record(m, key, result)
    report.seconds = time.perf_counter() - t0
    return report
