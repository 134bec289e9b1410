"""Frames per second of ``semifer predict`` on a 640x480 video with one face, detection included.

    python benchmarks/video_fps.py [--model NAME|PATH] [--frames 300] [--threads 2]

Makes a clip of skimage's astronaut photo panning and zooming slowly across a 640x480 frame
(MJPG .avi, 30 fps), then runs the whole predict path (decode, detect, align, classify, CSV)
with each detector setting and prints one table row each: frames/s, detection and
classification ms per frame, how many frames had a face, and how often the label equals the
one the same detector gives when it runs on every frame (what tracking costs in accuracy). docs/inference.md has the numbers.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_clip(path: Path, frames: int, size: tuple[int, int] = (640, 480), fps: float = 30.0) -> Path:
    """One face moving and zooming a little per frame (so every frame differs) over a 640x480 frame."""
    import cv2
    from skimage import data

    w, h = size
    photo = Image.fromarray(data.astronaut())
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    for i in range(frames):
        t = i / max(1, frames - 1)
        scale = 1.1 + 0.3 * np.sin(np.pi * t)                  # face about 100-130 px wide
        big = photo.resize((int(512 * scale), int(512 * scale)), Image.BILINEAR)
        x = int((big.width - w) * (0.2 + 0.6 * t)) if big.width > w else 0
        canvas = Image.new("RGB", (w, h), (90, 90, 90))
        canvas.paste(big.crop((x, 0, x + min(w, big.width), min(h, big.height))), (0, 0))
        writer.write(cv2.cvtColor(np.asarray(canvas), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="run dir, checkpoint, .onnx or bundled name (default: bundled)")
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: semifer's choice)")
    ap.add_argument("--settings", default="dlib:1,mtcnn:1,mtcnn:5,mtcnn:10",
                    help="comma-separated DETECTOR:DETECT_EVERY rows")
    a = ap.parse_args()
    import torch

    from semifer.engine.threads import apply_threads
    from semifer.infer import Predictor
    from semifer.infer.run import predict_media

    apply_threads(a.threads, verbose=True)
    with tempfile.TemporaryDirectory() as tmp:
        clip = make_clip(Path(tmp) / "clip.avi", a.frames)
        print(f"clip: {a.frames} frames 640x480; torch threads {torch.get_num_threads()}")
        print("| detector | detect every | frames/s | detect+align ms/frame | classify ms/frame | frames with a face "
              "| same label as every frame |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        labels: dict[tuple[str, int], list[str]] = {}
        for setting in a.settings.split(","):
            name, every = setting.split(":")
            pred = Predictor(a.model, detector=name, detect_every=int(every))
            t = time.perf_counter()
            rep = predict_media(pred, [str(clip)], Path(tmp) / f"out_{name}_{every}", progress=False)
            wall = time.perf_counter() - t
            import csv

            with open(rep.csv, newline="") as f:
                rows = list(csv.DictReader(f))
            labels[name, int(every)] = [r["label"] for r in rows if r["face"] in ("", "0")]
            with_face = sum(r["label"] != "none" for r in rows if r["face"] in ("", "0"))
            ref = labels.get((name, 1))
            same = f"{np.mean([x == y for x, y in zip(ref, labels[name, int(every)])]):.3f}" if ref else "-"
            print(f"| {name} | {every} | {rep.frames / wall:.1f} | {1000 * rep.detect_s / rep.frames:.1f} | "
                  f"{1000 * rep.classify_s / rep.frames:.2f} | {with_face}/{rep.frames} | {same} |", flush=True)


if __name__ == "__main__":
    main()
