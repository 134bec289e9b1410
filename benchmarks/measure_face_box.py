"""Measure where a face data set's crops sit relative to a detector's *box*: the numbers of
``faces/align.py``'s ``BOX_FRAMES`` (how predict cuts FER2013-frame crops from a new photo).

    python benchmarks/measure_face_box.py --split runs/bundled_fer2013_weak2/split.json --detector mtcnn

Each held-out training face (a run's ``split.json``; never the test set) is upscaled ``scale`` x
and pasted into the middle of a photo twice its size (as ``benchmarks/pasted_faces.py`` does), so
the crop's true place in the photo is known. For the detector's best face: log(crop side /
sqrt(box w * box h)) and the crop centre's offset from the box centre in units of sqrt(w h).
Printed: the medians (the entry for ``BOX_FRAMES``), their spread, and the same spread for the
five-landmark fit (``FRAMES``), for comparison: the smaller spread frames new faces more like
the data set did.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", type=Path, required=True, help="a training run's split.json (its held-out faces)")
    ap.add_argument("--detector", default="mtcnn")
    ap.add_argument("--frame", default="fer2013")
    ap.add_argument("--scale", type=int, default=3)
    ap.add_argument("--limit", type=int, default=0)
    a = ap.parse_args()
    from pasted_faces import backgrounds, paste, split_files
    from semifer.faces.align import frame_template, scale_shift
    from semifer.faces.detectors import build_detector

    files = split_files(a.split)
    if a.limit:
        files = files[:a.limit]
    det = build_detector(a.detector)
    side = 48 * a.scale
    bgs = backgrounds(side)
    true_c = side  # the face is pasted at [side/2, 3 side/2): centre `side`, side `side`
    box_rows, lm_rows = [], []
    for i, (f, _) in enumerate(files):
        faces = det(paste(Image.open(f).convert("RGB"), i, bgs, side))
        if not faces:
            continue
        fc = max(faces, key=lambda x: x.score)
        x1, y1, x2, y2 = fc.box
        b = np.sqrt((x2 - x1) * (y2 - y1))
        box_rows.append((np.log(side / b), (true_c - (x1 + x2) / 2) / b, (true_c - (y1 + y2) / 2) / b))
        m = scale_shift(fc.landmarks, frame_template(fc.scheme, a.frame, 48))
        s = 48 / m[0, 0]
        lm_rows.append((np.log(s / side), (-m[0, 2] / m[0, 0] + s / 2 - true_c) / side, (-m[1, 2] / m[0, 0] + s / 2 - true_c) / side))
        if (i + 1) % 500 == 0:
            print(f"  {i + 1}/{len(files)}", flush=True)
    box, lm = np.array(box_rows), np.array(lm_rows)
    med = np.median(box, 0)
    # the box fit's errors in crop sides, for comparison with the landmark fit's
    err = np.stack([box[:, 0] - med[0], (box[:, 1] - med[1]) * np.exp(-box[:, 0]), (box[:, 2] - med[2]) * np.exp(-box[:, 0])], 1)
    print(f"{a.detector}: a face in {len(box)}/{len(files)} held-out faces of {a.split}, pasted {a.scale}x")
    print(f"BOX_FRAMES[{a.frame!r}][{a.detector!r}] = ({med[0]:.4f}, {med[1]:.4f}, {med[2]:.4f})"
          "  # log(crop side / sqrt(box w h)), crop centre - box centre in sqrt(w h) (x, y)")
    print("| fit | log side: std | centre x: std (crop sides) | centre y: std |")
    print("|---|---:|---:|---:|")
    print(f"| detector box | {err[:, 0].std():.3f} | {err[:, 1].std():.3f} | {err[:, 2].std():.3f} |")
    print(f"| five landmarks ({a.frame} frame) | {lm[:, 0].std():.3f} | {lm[:, 1].std():.3f} | {lm[:, 2].std():.3f} |")


if __name__ == "__main__":
    main()
