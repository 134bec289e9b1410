"""Measure where a face data set puts the face: the similarity from the ArcFace 112 px frame to
its crops, fitted on a detector's five landmarks (how ``faces/align.py``'s FER2013 frame was obtained).

    python benchmarks/measure_face_frame.py ../shared/data/fer2013/val --limit 1500

Each crop is upscaled and pasted into the middle of a photo twice its size (a detector needs
room around the face); the landmarks of the best face are mapped back to the crop's unit
square. The median landmark positions over all detected faces, fitted from the detector's
template in the ArcFace frame, give the frame matrix printed at the end (unit-square
coordinates = M @ [x, y, 1] of ArcFace 112 px points).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from semifer.faces.align import TEMPLATES, umeyama
from semifer.faces.detectors import build_detector


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="image folder (class sub-folders or flat)")
    ap.add_argument("--limit", type=int, default=1500)
    ap.add_argument("--scale", type=int, default=3)
    ap.add_argument("--detector", default="mtcnn")
    a = ap.parse_args()
    files = sorted(p for p in a.folder.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    files = [files[i] for i in np.random.default_rng(0).permutation(len(files))[:a.limit]]
    from skimage import data as photos

    det = build_detector(a.detector)
    points, found, scheme = [], 0, None
    for f in files:
        img = Image.open(f).convert("RGB")
        side = img.width * a.scale
        pad = side // 2
        canvas = np.array(Image.fromarray(photos.coffee()).resize((2 * side, 2 * side)))
        canvas[pad:pad + side, pad:pad + side] = np.asarray(img.resize((side, side), Image.BICUBIC))
        faces = det(canvas)
        if faces:
            found += 1
            scheme = faces[0].scheme
            points.append((faces[0].landmarks - pad) / side)
    pts = np.median(np.stack(points), 0)
    m = umeyama(TEMPLATES[scheme], pts)
    resid = np.abs(np.stack(points) - pts).mean()
    print(f"{a.folder}: {a.detector} found a face in {found}/{len(files)} ({found / len(files):.1%}) crops upscaled {a.scale}x")
    print(f"median {scheme} landmarks in the unit crop:", np.round(pts, 4).tolist())
    print(f"mean |landmark - median| = {resid:.4f} of the crop side")
    print("frame matrix (ArcFace 112 px -> unit crop):", np.round(m, 6).tolist())
    print("fit residual:", float(np.abs(np.hstack([TEMPLATES[scheme], np.ones((5, 1))]) @ m.T - pts).max()))


if __name__ == "__main__":
    main()
