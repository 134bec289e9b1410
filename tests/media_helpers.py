"""Generated media for face tests: real photos skimage ships, videos made from them, broken files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def astronaut(size: int = 256) -> np.ndarray:
    """skimage's astronaut photo (one face) as RGB uint8, resized to ``size``."""
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((size, size), Image.BILINEAR))


def write_video(path: Path, frames: list[np.ndarray], fps: float = 10.0) -> Path:
    """An MJPG .avi from RGB frames (OpenCV's built-in codec, works without system ffmpeg)."""
    import cv2

    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened()
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def face_video(path: Path, pattern: str = "FF-F-") -> Path:
    """A video whose frame i shows the astronaut (shifted a little) where pattern[i] is F, grey noise elsewhere."""
    face = astronaut()
    rng = np.random.default_rng(0)
    frames = [np.roll(face, 4 * i, axis=1) if c == "F" else rng.integers(100, 140, face.shape, dtype=np.uint8)
              for i, c in enumerate(pattern)]
    return write_video(path, frames)


def broken_files(folder: Path) -> dict[str, Path]:
    """Corrupt, empty, truncated and non-image files (each must be skipped and counted)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {"corrupt": folder / "corrupt.jpg", "empty": folder / "empty.png",
           "truncated": folder / "truncated.jpg", "text": folder / "notes.txt", "badvideo": folder / "broken.mp4"}
    out["corrupt"].write_bytes(b"definitely not a jpeg " * 20)
    out["empty"].write_bytes(b"")
    buf = folder / "full.tmp"
    Image.fromarray(astronaut(128)).save(buf, format="JPEG")
    out["truncated"].write_bytes(buf.read_bytes()[:400])
    buf.unlink()
    out["text"].write_text("not media\n")
    out["badvideo"].write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200)
    return out
