"""Photo and video work of the web app, done by :func:`semifer.infer.run.predict_media`.

Photos and videos go through the same function as ``semifer predict``, so the CSV the page
offers is that command's file; only its ``source`` column differs: it holds the uploaded
file's name (the browser does not tell where the file was), not the server's temp path.
Everything is written under the app's temporary folder; the oldest jobs are deleted there
once more than ``keep`` exist, so a long session does not fill the disk.
"""
from __future__ import annotations

import csv
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from semifer.faces.media import IMAGE_EXTS, VIDEO_EXTS, Media, MediaError, load_rgb, video_info
from semifer.infer.run import predict_media, write_abaw_from_csv
from semifer.labels import ABAW_LABELS

_REASONS = {
    "not an image": "not an image (PNG, JPEG, WebP, BMP, GIF or TIFF expected)",
    "image too large": "image too large (over Pillow's decompression-bomb limit of pixels)",
    "empty file": "empty file",
    "corrupt image": "corrupt image (it cannot be decoded)",
    "truncated image": "truncated image (the file ends early)",
}
NO_FACE = "no face found in this photo"
THUMBS = 8  # annotated frames shown under a video's timeline


class UserError(ValueError):
    """A problem with what was uploaded; its message is shown in the page as it is."""


class Cancelled(Exception):
    """The server is shutting down while a video job runs."""


def safe_name(name: str, default: str = "upload") -> str:
    """A browser-given file name reduced to a plain file name (no folders, no odd characters)."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name or "").name).strip("._")
    return base[:80] or default


def _job_id() -> str:
    return uuid.uuid4().hex[:12]


def _faces_from_rows(rows: list[dict]) -> list[dict]:
    return [{"box": [float(r[k]) for k in ("x1", "y1", "x2", "y2")], "score": float(r["score"]),
             "probs": [float(r[k]) for k in ABAW_LABELS], "label": r["label"]} for r in rows if r["face"] != ""]


def _read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return list(csv.DictReader(f))


def _rename_sources(path: Path, names: dict[str, str]) -> None:
    """Rewrite the ``source`` column (server paths -> uploaded names); every other byte stays as predict wrote it."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = list(csv.reader(f))
    col = rows[0].index("source")
    for r in rows[1:]:
        r[col] = names.get(r[col], r[col])
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)  # the dialect semifer.infer.shards.CsvOut writes
    tmp.replace(path)


class _Folders:
    """Job folders under one root, the oldest deleted past ``keep``."""

    def __init__(self, root: Path, keep: int) -> None:
        self.root, self.keep = root, keep
        self.root.mkdir(parents=True, exist_ok=True)
        self._jobs: OrderedDict[str, Path] = OrderedDict()
        self._lock = threading.Lock()

    def new(self) -> tuple[str, Path]:
        job = _job_id()
        path = self.root / job
        path.mkdir()
        with self._lock:
            self._jobs[job] = path
            old = [self._jobs.popitem(last=False)[1] for _ in range(max(0, len(self._jobs) - self.keep))]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
        return job, path

    def get(self, job: str) -> Path | None:
        with self._lock:
            return self._jobs.get(job)

    def drop(self, job: str) -> None:
        with self._lock:
            path = self._jobs.pop(job, None)
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)


def _malloc_trim():
    """glibc's malloc_trim, or a no-op where there is none (musl, macOS, Windows)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda pad: 0


_TRIM = _malloc_trim()


def _trimmed(fn, *args):
    """``fn(*args)``, then free heap pages go back to the OS: glibc keeps them otherwise, and a
    burst of large photos would leave the server that much bigger for good."""
    try:
        return fn(*args)
    finally:
        _TRIM(0)


class PhotoService:
    """Faces and class probabilities of uploaded photos, one CSV per request."""

    def __init__(self, predictor, workdir: Path, keep: int = 20) -> None:
        self.predictor = predictor
        # One thread decodes and predicts every photo: the detector is not made for two threads at
        # once (the CPU is the limit anyway), and memory freed by one thread is reused by the next
        # photo instead of staying in a malloc arena per request thread (RSS would creep up).
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="semifer-photos")
        self.folders = _Folders(workdir / "photos", keep)

    def _run(self, fn, *args):
        return self._worker.submit(_trimmed, fn, *args).result()

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)

    def folder(self, job: str) -> Path | None:
        return self.folders.get(job)

    def predict(self, uploads: list[tuple[str, Path]], job_dir: Path) -> list[dict]:
        """Per upload (name, saved path): its size and faces or an error; writes job_dir/predictions.csv."""
        return self._run(self._predict, uploads, job_dir)

    def predict_live(self, name: str, path: Path) -> dict:
        """One webcam frame: faces only, no CSV."""
        return self._run(self._predict_live, name, path)

    def _predict(self, uploads: list[tuple[str, Path]], job_dir: Path) -> list[dict]:
        results, readable = [], {}
        for name, path in uploads:
            res = {"name": name, "width": 0, "height": 0, "faces": [], "error": None}
            results.append(res)
            if path.suffix.lower() in VIDEO_EXTS:
                res["error"] = f"{name}: a video file; use the Video tab"
                continue
            rgb, reason = load_rgb(path)
            if rgb is None:
                res["error"] = f"{name}: {_REASONS.get(reason, reason)}"
                continue
            res["height"], res["width"] = rgb.shape[:2]  # the pixels are not kept: predict_media decodes the file
            readable[str(path.resolve())] = res
        if readable:
            predict_media(self.predictor, list(readable), job_dir, progress=False)
            by_source: dict[str, list[dict]] = {}
            for row in _read_rows(job_dir / "predictions.csv"):
                by_source.setdefault(row["source"], []).append(row)
            for src, res in readable.items():
                res["faces"] = _faces_from_rows(by_source.get(src, []))
                if not res["faces"]:
                    res["error"] = f"{res['name']}: {NO_FACE}"
            _rename_sources(job_dir / "predictions.csv", {src: res["name"] for src, res in readable.items()})
        return results

    def _predict_live(self, name: str, path: Path) -> dict:
        rgb, reason = load_rgb(path)
        if rgb is None:
            raise UserError(f"{name}: {_REASONS.get(reason, reason)}")
        p = self.predictor.predict(rgb)
        faces = [{"box": [round(float(v), 1) for v in b], "score": float(s), "probs": [float(v) for v in pr],
                  "label": ABAW_LABELS[int(pr.argmax())]} for b, s, pr in zip(p.boxes, p.scores, p.probs)]
        return {"name": name, "width": rgb.shape[1], "height": rgb.shape[0], "faces": faces,
                "error": None if faces else NO_FACE}


@dataclass
class VideoJob:
    """One uploaded clip and where its processing stands (what the page polls)."""

    id: str
    name: str
    path: Path
    out: Path
    smooth: float
    every: int
    status: str = "queued"          # queued | running | done | error
    done: int = 0                   # frames processed
    total: int = 0                  # frames expected (container count / every; 0 when unknown)
    error: str | None = None
    result: dict = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def state(self) -> dict:
        return {"id": self.id, "name": self.name, "status": self.status, "done": self.done, "total": self.total,
                "error": self.error, "smooth": self.smooth, "every": self.every, **self.result}


class _Counting:
    """The predictor as predict_media sees it, counting frames for the progress bar."""

    def __init__(self, predictor, job: VideoJob, stop: threading.Event) -> None:
        self._p, self._job, self._stop = predictor, job, stop

    def __getattr__(self, name):
        return getattr(self._p, name)

    def _tick(self) -> None:
        if self._stop.is_set():
            raise Cancelled()
        self._job.done += 1

    def track(self, rgb):
        self._tick()
        return self._p.track(rgb)

    def detect(self, rgb):
        self._tick()
        return self._p.detect(rgb)


class VideoJobs:
    """Video uploads processed one at a time in a background thread."""

    def __init__(self, make_predictor, workdir: Path, keep: int = 10) -> None:
        self._make_predictor, self._predictor = make_predictor, None
        self.folders = _Folders(workdir / "videos", keep)
        self.jobs: dict[str, VideoJob] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="semifer-video")
        self._stop = threading.Event()

    def submit(self, name: str, save, smooth: float = 0.0, every: int = 1) -> VideoJob:
        """Start a job for an upload; ``save(path)`` writes the upload there. Bad input: UserError."""
        if not 0.0 <= smooth < 1.0:
            raise UserError(f"smoothing must be in [0, 1), got {smooth}")
        if not 1 <= every <= 1000:
            raise UserError(f"every must be between 1 and 1000, got {every}")
        suffix = Path(name).suffix.lower()
        if suffix not in VIDEO_EXTS:
            kind = "an image; use the Photos tab" if suffix in IMAGE_EXTS else "not a video file"
            raise UserError(f"{name}: {kind} (expected {', '.join(sorted(VIDEO_EXTS))})")
        job_id, out = self.folders.new()
        path = out / "upload" / safe_name(name, "video" + suffix)
        path.parent.mkdir()
        save(path)
        try:
            _, count = video_info(Media(str(path), "video"))
        except MediaError as e:
            self.folders.drop(job_id)
            raise UserError(f"{name}: OpenCV cannot read this video ({e})") from None
        job = VideoJob(job_id, name, path, out, float(smooth), int(every), total=-(-count // every) if count > 0 else 0)
        for old in [j for j in self.jobs if self.folders.get(j) is None]:
            del self.jobs[old]  # its folder was deleted past `keep`
        self.jobs[job_id] = job
        self._pool.submit(self._run, job)
        return job

    def _run(self, job: VideoJob) -> None:
        job.status = "running"
        try:
            if self._predictor is None:
                # its own predictor: video tracking state must not mix with photos served meanwhile
                self._predictor = self._make_predictor()
            job.result = self._process(job)
            job.status = "done"
        except Cancelled:
            job.status, job.error = "error", "the server stopped while this video was being processed"
        except UserError as e:
            job.status, job.error = "error", str(e)
        except Exception as e:  # noqa: BLE001 - a failed job is reported in the page; the server keeps serving
            job.status, job.error = "error", f"{job.name}: processing failed ({type(e).__name__}: {e})"
        finally:
            _TRIM(0)

    def _process(self, job: VideoJob) -> dict:
        t0 = time.perf_counter()
        rep = predict_media(_Counting(self._predictor, job, self._stop), [str(job.path)], job.out, every=job.every,
                            smooth=job.smooth, annotate=True, progress=False)
        if rep.frames == 0:
            reason = next(iter(rep.skips.counts), "no frame decoded")
            raise UserError(f"{job.name}: OpenCV cannot read this video ({reason})")
        abaw = write_abaw_from_csv(rep.csv, job.out, layout="txt")
        source = str(job.path.resolve())
        rows = _read_rows(rep.csv)
        _rename_sources(rep.csv, {source: job.name})
        frames: dict[int, dict] = {}
        for r in rows:  # the first face of each frame; frames without one stay gaps in the timeline
            f = frames.setdefault(int(r["frame"]), {"t": float(r["timestamp"]), "probs": None})
            if f["probs"] is None and r["face"] != "":
                f["probs"] = [float(r[k]) for k in ABAW_LABELS]
        order = sorted(frames)
        files = {"predictions.csv": "predictions.csv", "abaw": str(Path(abaw[0]).relative_to(job.out))}
        annotated = sorted((job.out / "annotated").glob("*.mp4"))
        thumbs = []
        if annotated:
            files["annotated.mp4"] = str(annotated[0].relative_to(job.out))
            webm, thumbs = _browser_copy(annotated[0], job.out)
            if webm is not None:
                files["annotated.webm"] = str(webm.relative_to(job.out))
        return {"frames": rep.frames, "faces": rep.faces, "seconds": round(time.perf_counter() - t0, 2),
                "labels": list(ABAW_LABELS), "timeline": {"frame": order, "t": [frames[i]["t"] for i in order],
                                                          "probs": [frames[i]["probs"] for i in order]},
                "files": files, "thumbs": [str(p.relative_to(job.out)) for p in thumbs]}

    def file(self, job_id: str, rel: str) -> Path | None:
        """A file of a job's output folder (never outside it)."""
        out = self.folders.get(job_id)
        if out is None:
            return None
        path = (out / rel).resolve()
        return path if path.is_file() and path.is_relative_to(out.resolve()) else None

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)


def _browser_copy(mp4: Path, out: Path) -> tuple[Path | None, list[Path]]:
    """A VP8 WebM copy of the annotated video (browsers do not play OpenCV's mp4v) and a few of its frames as JPEGs."""
    import cv2

    cap = cv2.VideoCapture(str(mp4))
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 25.0)
    pick = set(np.linspace(0, max(n - 1, 0), min(THUMBS, max(n, 1))).round().astype(int).tolist())
    webm_path, writer, encoding, thumbs, i = out / "annotated.webm", None, False, [], 0
    (out / "frames").mkdir(exist_ok=True)
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if writer is None:
                writer = cv2.VideoWriter(str(webm_path), cv2.VideoWriter_fourcc(*"VP80"), fps,
                                         (frame.shape[1], frame.shape[0]))
                encoding = writer.isOpened()  # False where OpenCV's FFmpeg has no VP8 encoder
            if encoding:
                writer.write(frame)
            if i in pick:
                thumbs.append(out / "frames" / f"{i:06d}.jpg")
                cv2.imwrite(str(thumbs[-1]), frame, [cv2.IMWRITE_JPEG_QUALITY, 85])
            i += 1
    finally:
        cap.release()
        if writer is not None:
            writer.release()
    ok = encoding and webm_path.is_file() and webm_path.stat().st_size > 0
    return (webm_path if ok else None), thumbs


__all__ = ["PhotoService", "VideoJobs", "VideoJob", "UserError", "safe_name"]
