"""Turning INPUT arguments into frames: image files, folders, video files and cameras.

Unusable inputs become ``(None, reason)`` or :class:`MediaError`, which callers count
as skips (``SkipCounter``); nothing here stops a run. OpenCV is imported only to read
video files and cameras.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from semifer.data.decode import SkipCounter, _to_8bit, open_checked

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"})
VIDEO_EXTS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp"})
_CAMERA = re.compile(r"^(?:cam|webcam|camera):(\d+)$")


class MediaError(Exception):
    """An input that cannot be read; ``str(e)`` is the skip reason."""


@dataclass(frozen=True)
class Media:
    """One source: ``kind`` is image, video or camera; ``path`` is absolute (or ``cam:N``)."""

    path: str
    kind: str


def expand_inputs(inputs: list[str], skips: SkipCounter) -> list[Media]:
    """Files, folders (searched recursively, sorted) and ``cam:N`` -> media, unusable ones counted."""
    out: list[Media] = []
    seen: set[str] = set()

    def add(m: Media) -> None:
        if m.path not in seen:
            seen.add(m.path)
            out.append(m)

    for inp in inputs:
        if _CAMERA.match(str(inp)):
            add(Media(str(inp), "camera"))
            continue
        p = Path(inp)
        if p.is_dir():
            for f in sorted(q for q in p.rglob("*") if q.is_file()):
                ext = f.suffix.lower()
                if ext in VIDEO_EXTS or ext in IMAGE_EXTS:
                    add(Media(str(f.resolve()), "video" if ext in VIDEO_EXTS else "image"))
                elif not f.name.startswith("."):
                    skips.add("not an image or video", str(f))
        elif p.is_file():
            # Explicit files are tried whatever their extension; decoding decides.
            add(Media(str(p.resolve()), "video" if p.suffix.lower() in VIDEO_EXTS else "image"))
        else:
            skips.add("missing file", str(inp))
    return out


def load_rgb(path: str | Path) -> tuple[np.ndarray | None, str | None]:
    """Full-resolution RGB uint8 (H, W, 3) with EXIF rotation applied, or ``(None, reason)``."""
    try:
        if Path(path).stat().st_size == 0:
            return None, "empty file"
        img = open_checked(path)
        img.load()
        img = ImageOps.exif_transpose(img)
        return np.asarray(_to_8bit(img).convert("RGB")), None
    except FileNotFoundError:
        return None, "missing file"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "image too large"
    except UnidentifiedImageError:
        return None, "not an image"
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        return None, "truncated image" if "truncated" in str(e).lower() else "corrupt image"


def _capture(media: Media):
    try:
        import cv2
    except ImportError:
        raise MediaError("video needs opencv-python-headless") from None
    m = _CAMERA.match(media.path)
    cap = cv2.VideoCapture(int(m.group(1)) if m else media.path)
    if not cap.isOpened():
        cap.release()
        raise MediaError("cannot open camera" if m else "unreadable video")
    return cv2, cap


def video_info(media: Media) -> tuple[float, int]:
    """(frames per second, frame count the container reports; -1 when unknown)."""
    cv2, cap = _capture(media)
    try:
        return float(cap.get(cv2.CAP_PROP_FPS) or 0.0), int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or -1)
    finally:
        cap.release()


def iter_frames(media: Media, every: int = 1, max_frames: int | None = None) -> Iterator[tuple[int, float, np.ndarray]]:
    """``(frame index, timestamp in s, RGB frame)`` for every ``every``-th frame of a source.

    Images are one frame at 0 s. A video that yields no frame at all raises MediaError;
    a read failure later ends the video (what decoders do with a truncated file).
    """
    if media.kind == "image":
        img, reason = load_rgb(media.path)
        if img is None:
            raise MediaError(reason)
        yield 0, 0.0, img
        return
    cv2, cap = _capture(media)
    try:
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        i = 0
        while max_frames is None or i < max_frames:
            if i % every == 0:
                ok, frame = cap.read()
                if ok and frame is not None:
                    ts = i / fps if fps > 0 else cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
                    yield i, ts, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            else:
                ok = cap.grab()  # skipped frames are not decoded to pixels
            if not ok:
                if i == 0:
                    raise MediaError("unreadable video")
                break
            i += 1
    finally:
        cap.release()


def count_frames(media: Media) -> int:
    """Frames a video really decodes to (container counts can be wrong), by grabbing them all."""
    cv2, cap = _capture(media)
    n = 0
    try:
        while cap.grab():
            n += 1
    finally:
        cap.release()
    return n
