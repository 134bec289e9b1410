"""Face detector speed on this machine: dlib HOG + 5-point landmarks + alignment per frame.

    python benchmarks/faces_speed.py [--repeats 20] [--video OUT.avi]

Times detection (and alignment of the faces found) on skimage's astronaut photo at a
few sizes and upsample settings; with ``--video`` also writes a 100-frame 640x480 test
video (the astronaut drifting across a noisy background) for timing ``semifer predict``.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from PIL import Image
from skimage import data

from semifer.faces import align_face, build_detector


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--video", help="also write a 100-frame 640x480 test video here")
    a = ap.parse_args()
    photo = data.astronaut()
    print("| image | upsample | faces | ms/frame |\n|---|---:|---:|---:|")
    for side in (256, 512, 1024):
        img = np.asarray(Image.fromarray(photo).resize((side, side), Image.BILINEAR))
        for upsample in (0, 1):
            det = build_detector("dlib", upsample=upsample)
            faces = det(img)  # warm-up
            t = time.perf_counter()
            for _ in range(a.repeats):
                for f in det(img):
                    align_face(img, f.landmarks, f.scheme)
            ms = 1000 * (time.perf_counter() - t) / a.repeats
            print(f"| {side}x{side} | {upsample} | {len(faces)} | {ms:.1f} |")
    if a.video:
        import cv2

        face = np.asarray(Image.fromarray(photo).resize((240, 240), Image.BILINEAR))
        rng = np.random.default_rng(0)
        w = cv2.VideoWriter(a.video, cv2.VideoWriter_fourcc(*"MJPG"), 25, (640, 480))
        for i in range(100):
            frame = rng.integers(90, 150, (480, 640, 3), dtype=np.uint8)
            x = 20 + 3 * i
            frame[120:360, x:x + 240] = face
            w.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        w.release()
        print(f"wrote {a.video}")


if __name__ == "__main__":
    main()
