"""The full ``predict`` path on FER2013 faces pasted into photos, against scoring the crops directly.

    python benchmarks/pasted_faces.py [--model NAME|PATH] [--data ../shared/data/fer2013/val]
        [--limit 0] [--detector mtcnn] [--rotations 30,-30,60,-60|none] [--fallback dlib_cnn|dlib|none] [--scale 3]
        [--split RUN_DIR/split.json] [--cache faces.npz]

Each face is upscaled (48 px x ``scale``) and pasted into the middle of a photo twice its size
(skimage's coffee, chelsea, rocket and brick in turn, none of which shows a face), then goes
through ``Predictor.predict``: detect, align to the model's face frame, classify. The best-scoring
face is the prediction; an image where no face is found counts as wrong. Printed: detection rate,
and accuracy / 7-class macro-F1 of the predict path and of the model on the original crops.

``--split`` takes a training run's ``split.json`` and uses its held-out part of the training folder
instead of ``--data`` (for choices made on faces that are not the test set). ``--cache`` stores the
detected faces (box, landmarks) per image and reuses them: detection is most of the cost, so other
models are scored on the same crops in a fraction of the time.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def class_files(root: Path) -> list[tuple[Path, int]]:
    """(image, ABAW index) for every image in class sub-folders named by expression."""
    from semifer.labels import label_index

    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        idx = label_index(d.name)
        out += [(f, idx) for f in sorted(d.iterdir()) if f.suffix.lower() in {".jpg", ".jpeg", ".png"}]
    return out


def split_files(split_json: Path) -> list[tuple[Path, int]]:
    """The held-out part (``val``) of a training run's ``split.json`` over a ``folder:`` source."""
    import json

    split = json.loads(split_json.read_text())
    kind, _, root = split["source"].partition(":")
    if kind != "folder":
        raise ValueError(f"{split_json}: --split needs a folder: source, not {split['source']!r}")
    root_path = Path(root)
    if not root_path.is_absolute():  # run configs are relative to the repository root
        root_path = Path(__file__).resolve().parents[1] / root_path
    files = class_files(root_path)
    if len(files) != split["num_samples"]:
        raise ValueError(f"{split_json}: {split['num_samples']} samples recorded, {len(files)} images in {root_path}")
    return [files[i] for i in split["val"]]


def paste(img: Image.Image, i: int, bgs: list[np.ndarray], side: int) -> np.ndarray:
    """Image ``i`` upscaled to ``side`` and pasted into the middle of background ``i % len(bgs)``."""
    canvas = bgs[i % len(bgs)].copy()
    canvas[side // 2:side // 2 + side, side // 2:side // 2 + side] = np.asarray(img.resize((side, side), Image.BICUBIC))
    return canvas


def load_cache(path: Path, files: list[tuple[Path, int]], side: int) -> list | None:
    """Cached best face per image (``None`` = no face), or None when ``path`` is absent or was made
    for other images / another paste size (then it is rebuilt, never mixed)."""
    from semifer.faces.detectors import Face

    if not path.exists():
        return None
    z = np.load(path, allow_pickle=False)
    if list(z["files"]) != [str(f) for f, _ in files] or int(z["side"]) != side:
        print(f"{path}: made for other images or paste size; detecting again")
        return None
    if "detectors" not in z:
        print(f"{path}: made before faces recorded their detector; detecting again")
        return None
    return [Face(b, float(s), lm, str(sc), str(d)) if ok else None
            for ok, b, s, lm, sc, d in zip(z["found"], z["boxes"], z["scores"], z["landmarks"], z["schemes"], z["detectors"])]


def save_cache(path: Path, files: list[tuple[Path, int]], side: int, faces: list) -> None:
    ok = [f is not None for f in faces]
    pick = lambda attr, shape: np.array([getattr(f, attr) if f is not None else np.zeros(shape) for f in faces])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, files=np.array([str(f) for f, _ in files]), side=side, found=np.array(ok),
             boxes=pick("box", 4), landmarks=pick("landmarks", (5, 2)),
             scores=np.array([f.score if f is not None else 0.0 for f in faces]),
             schemes=np.array([f.scheme if f is not None else "" for f in faces]),
             detectors=np.array([f.detector if f is not None else "" for f in faces]))
    tmp.replace(path)


def backgrounds(side: int) -> list[np.ndarray]:
    from skimage import data

    out = []
    for name in ("coffee", "chelsea", "rocket", "brick"):
        im = getattr(data, name)()
        im = np.repeat(im[..., None], 3, 2) if im.ndim == 2 else im[..., :3]
        out.append(np.asarray(Image.fromarray(im).resize((2 * side, 2 * side), Image.BILINEAR)))
    return out


def scores(y_true: list[int], y_pred: list[int]) -> tuple[float, float]:
    """(accuracy, macro-F1 over the classes present in y_true); -1 predictions are wrong."""
    from semifer.eval.metrics import classification_scores
    from semifer.labels import ABAW_LABELS

    yt, yp = np.array(y_true), np.array(y_pred)
    acc = float((yt == yp).mean())
    yp = np.where(yp < 0, len(ABAW_LABELS), yp)  # "no face" as its own column, never right
    s = classification_scores(yt, yp, (*ABAW_LABELS, "no face"))
    present = sorted(set(y_true))
    return acc, float(np.mean([s["per_class_f1"][ABAW_LABELS[i]] for i in present]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "fer2013" / "val")
    ap.add_argument("--limit", type=int, default=0, help="a seeded random subset of this many images (0 = all)")
    ap.add_argument("--detector", default="mtcnn")
    ap.add_argument("--rotations", default="30,-30,60,-60",
                    help="angles tried where no face is found (predict's default; none = off)")
    ap.add_argument("--fallback", default="dlib_cnn", help="detector tried last where nothing was found "
                    "(predict's default; dlib = HOG; none = off)")
    ap.add_argument("--scale", type=int, default=3)
    ap.add_argument("--split", type=Path, default=None, help="a training run's split.json: score its held-out faces")
    ap.add_argument("--cache", type=Path, default=None, help="detected faces are stored here and reused")
    a = ap.parse_args()
    from semifer.data.decode import decode_image
    from semifer.infer import Predictor

    files = split_files(a.split) if a.split else class_files(a.data)
    if a.limit:
        files = [files[i] for i in np.random.default_rng(0).permutation(len(files))[:a.limit]]
    rot = tuple(float(v) for v in a.rotations.split(",")) if a.rotations not in ("", "none") else ()
    a.fallback = None if a.fallback in ("", "none") else a.fallback
    pred = Predictor(a.model, detector=a.detector, rotations=rot, fallback_detector=a.fallback)
    c = pred.classifier
    side = 48 * a.scale
    bgs = backgrounds(side)
    cached = load_cache(a.cache, files, side) if a.cache else None
    y, direct, full, best_faces = [], [], [], []
    for i, (f, label) in enumerate(files):
        img = Image.open(f).convert("RGB")
        x = decode_image(np.asarray(img), c.image_size, c.channels)[0][None].astype(np.float32) / 255.0
        direct.append(int(c(x).argmax()))
        canvas = paste(img, i, bgs, side)
        if cached is None:
            faces, crops = pred.detect(canvas)
            probs = pred.classify(crops)
            best = int(np.argmax([fc.score for fc in faces])) if faces else -1
            face = faces[best] if faces else None
            full.append(int(probs[best].argmax()) if faces else -1)
        else:  # the same best face as predict found, cropped and classified as predict does
            face = cached[i]
            full.append(int(pred.classify(pred.crops(canvas, [face]))[0].argmax()) if face is not None else -1)
        best_faces.append(face)
        y.append(label)
        if (i + 1) % 500 == 0:
            print(f"  {i + 1}/{len(files)}", flush=True)
    if a.cache and cached is None:
        save_cache(a.cache, files, side, best_faces)
    found = sum(fc is not None for fc in best_faces)
    acc_d, f1_d = scores(y, direct)
    acc_f, f1_f = scores(y, full)
    print(f"model {pred.model_path}, face frame {getattr(c, 'face_frame', 'arcface112')}, detector {a.detector}"
          f"{' + rotations ' + a.rotations if rot else ''}{' + fallback ' + a.fallback if a.fallback else ''}; "
          f"{len(files)} images of {a.split or a.data}{' (cached faces: ' + str(a.cache) + ')' if cached else ''}")
    print("| path | faces found | accuracy | macro-F1 (7) |")
    print("|---|---:|---:|---:|")
    print(f"| crops scored directly | - | {acc_d:.4f} | {f1_d:.4f} |")
    print(f"| pasted, full predict path | {found / len(files):.4f} | {acc_f:.4f} | {f1_f:.4f} |")
    print(f"accuracy gap: {acc_d - acc_f:+.4f}")


if __name__ == "__main__":
    main()
