"""Decoding images once, robustly: bad files are skipped and counted, never fatal.

Every reader funnels its images through :func:`decode_image`; a corrupt, truncated,
zero-byte or non-image file, or one PIL cannot convert, yields ``None`` plus a reason
that a :class:`SkipCounter` records. Odd modes are converted, not skipped: CMYK and
palette images to RGB, 16-bit and 32-bit greyscale scaled to 8 bits, alpha dropped.
"""
from __future__ import annotations

import io
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


@dataclass
class SkipCounter:
    """Counts skipped inputs by reason and keeps a few examples of each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)

    def summary(self) -> str:
        if not self.counts:
            return "no inputs skipped"
        parts = [f"{n} {reason} (e.g. {', '.join(self.examples[reason][:2])})" for reason, n in self.counts.most_common()]
        return f"skipped {self.total}: " + "; ".join(parts)


def _to_8bit(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to L or RGB with 8 bits per channel."""
    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") else max(float(a.max()), 1.0)
        return Image.fromarray(np.clip(a / hi * 255.0, 0, 255).round().astype(np.uint8), "L")
    if mode in ("1", "LA", "La"):
        return img.convert("L")
    if mode == "P":
        return img.convert("RGBA").convert("RGB")
    return img.convert("RGB")  # CMYK, YCbCr, RGBA, RGBX, LAB, HSV


def open_checked(fh) -> Image.Image:
    """``Image.open`` that refuses images over ``Image.MAX_IMAGE_PIXELS`` before decoding them.

    PIL only *warns* between 1x and 2x the limit; turning that warning into an error with
    ``warnings.catch_warnings`` is not thread-safe (readers decode in a thread pool), so the
    size is checked here from the header, deterministically.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(fh)
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and img.width * img.height > limit:
        img.close()
        raise Image.DecompressionBombError(f"{img.width}x{img.height} pixels exceed the {limit} limit")
    return img


def decode_image(src: bytes | str | Path | np.ndarray, size: int, channels: int = 3,
                 box: tuple[float, float, float, float] | None = None) -> tuple[np.ndarray | None, str | None]:
    """Decode to uint8 (channels, size, size), or ``(None, reason)`` when the input is unusable.

    ``box`` = (left, top, right, bottom) in pixels crops before resizing (clamped to the image).
    """
    try:
        if isinstance(src, np.ndarray):
            arr = src
            if arr.dtype != np.uint8:
                return None, "array not uint8"
            img = Image.fromarray(arr.squeeze(-1) if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
        else:
            if isinstance(src, (bytes, bytearray, memoryview)):
                if len(src) == 0:
                    return None, "empty file"
                fh = io.BytesIO(src)
            else:
                p = Path(src)
                if p.stat().st_size == 0:
                    return None, "empty file"
                fh = p
            img = open_checked(fh)
            img.load()
        img = _to_8bit(img)
        if box is not None:
            l, t, r, b = (float(v) for v in box)
            l, t = max(0.0, l), max(0.0, t)
            r, b = min(float(img.width), r), min(float(img.height), b)
            if r - l < 2 or b - t < 2:
                return None, "empty face box"
            img = img.crop((int(l), int(t), int(round(r)), int(round(b))))
        img = img.convert("L" if channels == 1 else "RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR, reducing_gap=3.0)
        a = np.asarray(img, dtype=np.uint8)
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        return np.ascontiguousarray(a), None
    except FileNotFoundError:
        return None, "missing file"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "image too large"
    except UnidentifiedImageError:
        return None, "not an image"
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated/corrupt data, bad headers
        msg = str(e).lower()
        return None, "truncated image" if "truncated" in msg else "corrupt image"
