"""``semifer predict``: expression probabilities for every face of every frame.

``OUT/predictions.csv`` has one row per face per frame (PRED_COLUMNS); a frame without a
face gets one row with an empty ``face``, box and probabilities and the label ``none``.
The file is written as ``.predictions.csv.partial`` and renamed when the run ends, so a
finished file is always complete. Unreadable inputs are skipped and counted. Sharded over
processes (torchrun or ``--shard I/N``), each shard writes its own file under ``OUT/shards/``
and the merge gives the one-process file (:mod:`semifer.infer.shards`).
"""
from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from semifer.data.decode import SkipCounter
from semifer.faces.media import VIDEO_EXTS, Media, MediaError, count_frames, expand_inputs, iter_frames
from semifer.infer.shards import (CsvOut, Shard, completed_shard, fingerprint, merge_shards, shard_files,
                                  skips_from_dicts, skips_to_dict, wait_for_ranks)
from semifer.labels import ABAW_LABELS

PRED_COLUMNS = ["source", "frame", "timestamp", "face", "x1", "y1", "x2", "y2", "score", *ABAW_LABELS, "label"]
NO_FACE = "none"


@dataclass
class PredictReport:
    """Counts and timings of one ``predict`` call."""

    csv: Path
    sources: int = 0
    frames: int = 0
    faces: int = 0
    rows: int = 0
    detect_s: float = 0.0
    classify_s: float = 0.0
    seconds: float = 0.0
    skips: SkipCounter = field(default_factory=SkipCounter)
    abaw_files: list[str] = field(default_factory=list)
    shard: str = ""         # "I/N" for one shard's report, "merged N" after a merge
    reused: bool = False    # the shard was complete from an earlier run

    def summary(self) -> str:
        if self.reused:
            return f"{self.shard} already complete, not redone ({self.rows} rows, {self.skips.summary()}): {self.csv}"
        fps = self.frames / self.seconds if self.seconds > 0 else 0.0
        per_face = 1000 * self.classify_s / self.faces if self.faces else 0.0
        per_frame = 1000 * self.detect_s / self.frames if self.frames else 0.0
        return (f"{self.sources} sources, {self.frames} frames, {self.faces} faces -> {self.rows} rows in "
                f"{self.seconds:.1f} s: {fps:.1f} frames/s, {self.faces / max(self.seconds, 1e-9):.1f} faces/s "
                f"(detect+align {per_frame:.1f} ms/frame, classify {per_face:.2f} ms/face); "
                f"{self.skips.summary()}; wrote {self.csv}" + (f" ({self.shard})" if self.shard else ""))


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix between boxes a (N, 4) and b (M, 4)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: np.clip(x[:, 2:] - x[:, :2], 0, None).prod(-1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


class Smoother:
    """Exponential smoothing of each face's probabilities along a video.

    A face continues the previous frame's face it overlaps most (IoU >= 0.3, greedy);
    ``p_t = alpha * p_prev + (1 - alpha) * p_now``. New faces start unsmoothed.
    """

    def __init__(self, alpha: float, min_iou: float = 0.3) -> None:
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"smoothing alpha must be in [0, 1), got {alpha}")
        self.alpha, self.min_iou = alpha, min_iou
        self.boxes = np.zeros((0, 4))
        self.probs = np.zeros((0, len(ABAW_LABELS)))

    def __call__(self, boxes: np.ndarray, probs: np.ndarray) -> np.ndarray:
        out = probs.astype(np.float64).copy()
        if self.alpha > 0 and len(boxes) and len(self.boxes):
            iou = _iou(boxes, self.boxes)
            for _ in range(min(iou.shape)):
                i, j = np.unravel_index(iou.argmax(), iou.shape)
                if iou[i, j] < self.min_iou:
                    break
                out[i] = self.alpha * self.probs[j] + (1 - self.alpha) * probs[i]
                iou[i, :], iou[:, j] = -1, -1
        self.boxes, self.probs = boxes, out
        return out


def _annotate(rgb: np.ndarray, boxes: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Box and "Label 0.87" on a dark box above each face, the text sized to the face (legible at any scale)."""
    from PIL import ImageFont

    img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    width = max(2, round(max(rgb.shape[:2]) / 300))
    for box, p in zip(boxes, probs):
        k = int(p.argmax())
        x0, y0, x1, _ = (float(v) for v in box)
        draw.rectangle([float(v) for v in box], outline=(255, 220, 0), width=width)
        size = int(np.clip((x1 - x0) / 6, 12, 64))  # about a sixth of the face width
        font = ImageFont.load_default(size=size)
        text = f"{ABAW_LABELS[k]} {p[k]:.2f}"
        tx0, ty0, tx1, ty1 = draw.textbbox((0, 0), text, font=font)
        pad = max(2, size // 6)
        h = ty1 - ty0 + 2 * pad
        top = y0 - h if y0 - h >= 0 else y0  # above the box, or inside it at the top edge of the photo
        draw.rectangle([x0, top, x0 + tx1 - tx0 + 2 * pad, top + h], fill=(0, 0, 0))
        draw.text((x0 + pad - tx0, top + pad - ty0), text, fill=(255, 220, 0), font=font)
    return np.asarray(img)


class _Annotator:
    """Writes annotated images (JPEG) and videos (mp4v) under OUT/annotated/."""

    def __init__(self, out: Path, media: Media, fps: float) -> None:
        out.mkdir(parents=True, exist_ok=True)
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(media.path).stem)[:60] or "source"
        self.base = out / f"{stem}_{hashlib.sha1(os.fsencode(media.path)).hexdigest()[:8]}"
        self.video = media.kind != "image"
        self.fps, self.writer = fps, None

    def add(self, rgb: np.ndarray) -> None:
        if not self.video:
            Image.fromarray(rgb).save(self.base.with_suffix(".jpg"), quality=90)
            return
        import cv2

        if self.writer is None:
            self.writer = cv2.VideoWriter(str(self.base.with_suffix(".mp4")), cv2.VideoWriter_fourcc(*"mp4v"),
                                          self.fps or 25.0, (rgb.shape[1], rgb.shape[0]))
        self.writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()


def _rows(source: str, index: int, ts: float, boxes, scores, probs) -> list[list]:
    if len(boxes) == 0:
        return [[source, index, f"{ts:.3f}", "", "", "", "", "", "", *[""] * len(ABAW_LABELS), NO_FACE]]
    return [[source, index, f"{ts:.3f}", k, *(f"{v:.1f}" for v in b), f"{s:.4f}", *(f"{v:.6f}" for v in p),
             ABAW_LABELS[int(p.argmax())]] for k, (b, s, p) in enumerate(zip(boxes, scores, probs))]


def predict_media(predictor, inputs: list[str], out: Path | str, every: int = 1, smooth: float = 0.0,
                  annotate: bool = False, max_frames: int | None = None, abaw: str | None = None,
                  fill: str = "nearest", progress: bool = True, shard: Shard | None = None) -> PredictReport:
    """Run ``predictor`` over images, folders, videos and ``cam:N``; write ``out/predictions.csv``.

    ``abaw`` = ``txt`` (one file per video under ``out/abaw/``) or ``single``
    (``out/abaw_predictions.txt``) also writes ABAW files (see :mod:`semifer.infer.abaw`).

    ``shard`` (``--shard I/N`` or torchrun's rank, :mod:`semifer.infer.shards`): handle sources
    ``I, I+N, ...`` only and write ``out/shards/predictions.I-of-N.csv``; a shard already complete
    for the same job is not redone. Under torchrun rank 0 then waits for every rank and merges
    (:func:`merge_predictions`); ABAW files are written after the merge only.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if abaw not in (None, "txt", "single"):
        raise ValueError(f"--abaw must be txt or single, got {abaw!r}")
    shard = shard or Shard()
    t0 = time.perf_counter()
    skips = SkipCounter()
    media = expand_inputs(inputs, skips)
    if shard.count == 1:
        report = PredictReport(out / "predictions.csv", skips=skips)
        sink = CsvOut(report.csv, PRED_COLUMNS)
        try:
            _predict_sources(predictor, list(enumerate(media)), sink, report, out, every, smooth, annotate,
                             max_frames, progress, keyed=False)
        except BaseException:
            sink.abort()
            raise
        sink.commit()
    else:
        report = _predict_shard(predictor, media, skips, out, shard, every, smooth, annotate, max_frames, progress)
        if not shard.launched:
            return report  # the other shards run elsewhere: `semifer predict --merge OUT`
        wait_for_ranks(shard)
        if shard.index != 0:
            return report
        report = merge_predictions(out, count=shard.count, launched=True)
    if abaw:
        report.abaw_files = write_abaw_from_csv(report.csv, out, layout=abaw, fill=fill)
    report.seconds = time.perf_counter() - t0
    return report


_COUNTS = ("sources", "frames", "faces", "rows", "detect_s", "classify_s")


def _predict_shard(predictor, media: list[Media], skips: SkipCounter, out: Path, shard: Shard, every: int,
                   smooth: float, annotate: bool, max_frames: int | None, progress: bool) -> PredictReport:
    csv_path, meta_path = shard_files(out, "predictions", shard)
    model = getattr(predictor, "model_path", None)
    stat = Path(model).stat() if model and Path(model).is_file() else None
    fp = fingerprint({"model": model, "model_file": stat and (stat.st_size, stat.st_mtime_ns),
                      "detector": getattr(predictor, "detector_name", None),
                      "detector_options": getattr(predictor, "detector_options", None),
                      "every": every, "smooth": smooth, "max_frames": max_frames, "sources": len(media),
                      "media": hashlib.sha1("\n".join(f"{m.kind}:{m.path}" for m in media).encode(
                          "utf-8", "surrogateescape")).hexdigest()})
    done = completed_shard(out, "predictions", shard, fp)
    if done is not None:
        report = PredictReport(csv_path, **{k: done[k] for k in _COUNTS}, seconds=done["seconds"],
                               skips=skips_from_dicts([done["skips"]]), shard=f"shard {shard}", reused=True)
        if progress:
            print(f"  shard {shard}: already complete ({csv_path}), not redone", flush=True)
        return report
    t0 = time.perf_counter()
    # inputs that expand to nothing are counted once, by shard 0
    report = PredictReport(csv_path, skips=skips if shard.index == 0 else SkipCounter(), shard=f"shard {shard}")
    mine = [(i, media[i]) for i in shard.indices(len(media))]
    sink = CsvOut(csv_path, PRED_COLUMNS, keys=1)
    try:
        _predict_sources(predictor, mine, sink, report, out, every, smooth, annotate, max_frames, progress, keyed=True)
    except BaseException:
        sink.abort()
        raise
    report.seconds = time.perf_counter() - t0
    sink.commit({"fingerprint": fp, "shard": str(shard), "order_keys": 1, "seconds": report.seconds,
                 **{k: getattr(report, k) for k in _COUNTS}, "skips": skips_to_dict(report.skips)}, meta_path)
    return report


def merge_predictions(out: Path | str, abaw: str | None = None, fill: str = "nearest",
                      count: int | None = None, launched: bool = False) -> PredictReport:
    """``OUT/predictions.csv`` from the shard files of a sharded run (refused while any is missing).

    Rows and their order are those of a one-process run; counts and skips are summed, the
    time is the slowest shard's (they ran side by side).
    """
    out = Path(out)
    metas = merge_shards(out, "predictions", PRED_COLUMNS, out / "predictions.csv", count, launched)
    report = PredictReport(out / "predictions.csv", **{k: sum(m[k] for m in metas) for k in _COUNTS},
                           seconds=max(m["seconds"] for m in metas),
                           skips=skips_from_dicts([m["skips"] for m in metas]), shard=f"merged {len(metas)} shards")
    if abaw:
        report.abaw_files = write_abaw_from_csv(report.csv, out, layout=abaw, fill=fill)
    return report


def _predict_sources(predictor, media: list[tuple[int, Media]], sink: CsvOut, report: PredictReport, out: Path,
                     every: int, smooth: float, annotate: bool, max_frames: int | None, progress: bool,
                     keyed: bool) -> None:
    for i, m in media:
        report.sources += 1
        _predict_source(predictor, m, sink, report, out, every, smooth, annotate, max_frames, (i,) if keyed else ())
        sink.flush()
        if progress:
            print(f"  {m.path}: done ({report.frames} frames so far)", flush=True)


def _predict_source(predictor, m: Media, sink: CsvOut, report: PredictReport, out: Path, every: int, smooth: float,
                    annotate: bool, max_frames: int | None, key: tuple[int, ...] = ()) -> None:
    smoother = Smoother(smooth)
    annot = None
    pending: list[tuple] = []  # frames whose faces wait for the next classifier batch

    def flush() -> None:
        crops = [c for item in pending for c in item[4]]
        t = time.perf_counter()
        probs = predictor.classify(crops)
        report.classify_s += time.perf_counter() - t
        start = 0
        for index, ts, rgb, faces, fc in pending:
            p = probs[start:start + len(fc)]
            start += len(fc)
            boxes = np.array([f.box for f in faces]).reshape(-1, 4)
            p = smoother(boxes, p) if m.kind != "image" else p
            rows = _rows(m.path, index, ts, boxes, [f.score for f in faces], p)
            sink.writerows(rows, key)
            report.rows += len(rows)
            report.faces += len(faces)
            if annot is not None:
                annot.add(_annotate(rgb, boxes, p))
        pending.clear()

    try:
        if annotate:
            from semifer.faces.media import video_info

            # cameras are not opened twice; their annotated video is written at 25 fps
            annot = _Annotator(out / "annotated", m, video_info(m)[0] / every if m.kind == "video" else 0.0)
        tracking = m.kind != "image" and hasattr(predictor, "track")
        if tracking:
            predictor.reset_tracking()
        for index, ts, rgb in iter_frames(m, every=every, max_frames=max_frames):
            t = time.perf_counter()
            try:
                faces, crops = predictor.track(rgb) if tracking else predictor.detect(rgb)
            except Exception as e:  # noqa: BLE001 - a frame the detector rejects is counted, not fatal
                report.skips.add(f"detector error ({type(e).__name__})", f"{m.path}#{index}")
                faces, crops = [], []
            report.detect_s += time.perf_counter() - t
            report.frames += 1
            pending.append((index, ts, rgb if annotate else None, faces, crops))
            if sum(len(p[4]) for p in pending) >= predictor.batch_size or len(pending) >= 256:
                flush()
    except MediaError as e:
        report.skips.add(str(e), m.path)
    except KeyboardInterrupt:
        if m.kind != "camera":  # Ctrl-C is how a camera stream ends
            raise
    finally:
        if pending:
            flush()
        if annot is not None:
            annot.close()


def write_abaw_from_csv(csv_path: Path | str, out: Path | str, layout: str = "txt", fill: str = "nearest",
                        frame_counts: dict[str, int] | None = None) -> list[str]:
    """ABAW files for the video sources of a ``predictions.csv``.

    Frame counts come from ``frame_counts`` (by source path or video name) or from decoding
    each video again; a prediction past the end of its video is an error.
    """
    from semifer.infer.abaw import labels_from_predictions, write_single_file, write_video_txt

    out = Path(out)
    by_source = {s: v for s, v in labels_from_predictions(csv_path).items() if Path(s).suffix.lower() in VIDEO_EXTS}
    if not by_source:
        raise ValueError(f"{csv_path}: no video sources to write ABAW files for")
    videos: dict[str, tuple[dict[int, int], int]] = {}
    for source, labels in by_source.items():
        name = Path(source).stem
        counts = frame_counts or {}
        n = counts.get(source, counts.get(name))
        if n is None:
            try:
                n = count_frames(Media(source, "video"))
            except MediaError as e:
                raise ValueError(f"{source}: cannot count its frames ({e}); pass the frame counts") from None
        if name in videos:
            raise ValueError(f"two videos named {name!r}; ABAW files are named by video")
        videos[name] = (labels, int(n))
    if layout == "single":
        path = out / "abaw_predictions.txt"
        write_single_file(path, videos, fill)
        return [str(path)]
    files = []
    for name, (labels, n) in sorted(videos.items()):
        write_video_txt(out / "abaw" / f"{name}.txt", labels, n, fill)
        files.append(str(out / "abaw" / f"{name}.txt"))
    return files
