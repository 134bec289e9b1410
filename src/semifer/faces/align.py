"""Five-landmark similarity alignment to the 112x112 ArcFace (insightface) template.

Every detector reports its landmarks in a named *scheme*; each scheme has its own
target points in the same 112x112 frame, so crops from different detectors line up.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

CROP_SIZE = 112

# insightface's arcface_dst: left eye, right eye, nose tip, left and right mouth corner
# (left/right as seen in the image).
ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)

# dlib's 5-point model marks other points: outer and inner corner of the image-right eye,
# outer and inner corner of the image-left eye, bottom of the nose. Their places in the
# ArcFace frame were measured once on skimage's astronaut photo with dlib's 68-point model:
# similarity fit of its eye centres and nose tip onto ARCFACE_112, then the 5-point model's
# points mapped through it (the mouth corners were left out of that fit: she smiles).
DLIB5_112 = np.array([[80.3, 51.5], [66.4, 53.0], [31.2, 51.4], [45.1, 52.4], [56.1, 78.0]],
                     dtype=np.float64)

TEMPLATES: dict[str, np.ndarray] = {"arcface5": ARCFACE_112, "dlib5": DLIB5_112}

# A face *frame* is where a data set puts the face in its crops: the similarity (2x3) from
# the ArcFace 112 px frame to the crop's unit square. A model is fed crops in the frame it was
# trained on (``data.face_frame``, stored with every checkpoint and ONNX file).
# fer2013: FER2013's 48 px crops, measured with ``benchmarks/measure_face_frame.py
# ../shared/data/fer2013/val --limit 1000`` (MTCNN found 851 faces; the median landmarks,
# rotation dropped: the crops are upright). They are tighter than ArcFace crops: 112 ArcFace
# px = 1.13 FER2013 crop sides, and the eyes sit at 39 % of the height instead of 46 %.
FRAMES: dict[str, np.ndarray] = {
    "arcface112": np.array([[1 / CROP_SIZE, 0.0, 0.0], [0.0, 1 / CROP_SIZE, 0.0]]),
    "fer2013": np.array([[0.010128, 0.0, -0.065953], [0.0, 0.010128, -0.130224]]),
}


# Frames whose data set cut its crops as upright boxes from the photo (FER2013): a face there keeps
# its head tilt, so new faces are cut the same way, by scale and shift only. Rotating them upright
# fed the bundled model faces it had not seen: on 400 pasted fer2013/val faces the predict path
# scored 0.595 accuracy with rotation, 0.618 upright (crops scored directly: 0.683;
# docs/inference.md).
UPRIGHT_FRAMES = frozenset({"fer2013"})


# Where a frame's crops sit relative to each detector's *box*, for UPRIGHT_FRAMES: (log(crop side /
# sqrt(box w * h)), crop centre - box centre in units of sqrt(w h), x and y). Measured with
# ``benchmarks/measure_face_box.py --split runs/bundled_fer2013_weak2/split.json --detector D``
# on 1,437 held-out FER2013 *train* faces pasted into photos (medians). FER2013's crops were cut
# from detector boxes, and a box follows them more closely than the five-landmark fit, whose mouth
# corners move with the expression (disgust faces came out 0.15 log-units too loose): on those
# faces the box fit's spread is 0.175 in log side and 0.058 / 0.056 of a side in centre x / y, the
# landmark fit's 0.183 and 0.071 / 0.061; the bundled model's accuracy on them, through predict's
# crops, went from 0.6806 to 0.6882 (docs/inference.md). Detectors not listed are cut from their
# landmarks (FRAMES).
BOX_FRAMES: dict[str, dict[str, tuple[float, float, float]]] = {
    "fer2013": {
        "mtcnn": (0.0951, 0.0063, -0.0123),       # 1,317 of 1,437 faces found
        "dlib": (0.1100, -0.0116, -0.0939),       # HOG: 946 faces; spread 0.151 / 0.061 / 0.064 (landmarks 0.165 / 0.062 / 0.050)
        "dlib_cnn": (0.0535, 0.0088, -0.0293),    # MMOD: spread 0.178 / 0.062 / 0.066 (landmarks 0.193 / 0.070 / 0.062)
    },
}


def scale_shift(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares uniform scale + shift (no rotation) mapping ``src`` onto ``dst``, as a 2x3 matrix."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var_s = (s ** 2).sum()
    scale = float((s * d).sum() / var_s) if var_s > 0 else 1.0
    return np.array([[scale, 0.0, mu_d[0] - scale * mu_s[0]], [0.0, scale, mu_d[1] - scale * mu_s[1]]])


def frame_template(scheme: str, frame: str = "arcface112", size: int = CROP_SIZE) -> np.ndarray:
    """Where ``scheme``'s five landmarks sit in a ``size`` px crop of face frame ``frame``."""
    if scheme not in TEMPLATES:
        raise KeyError(f"unknown landmark scheme {scheme!r}; known: {sorted(TEMPLATES)}")
    if frame not in FRAMES:
        raise KeyError(f"unknown face frame {frame!r}; known: {sorted(FRAMES)}")
    m = FRAMES[frame]
    return (TEMPLATES[scheme] @ m[:, :2].T + m[:, 2]) * size


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, shift) mapping ``src`` onto ``dst``.

    Umeyama (1991); returns the 2x3 matrix ``M`` with ``dst ~ M @ [x, y, 1]``.
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need matching (N>=2, 2) point sets, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # a reflection is not a similarity
        sign[1, 1] = -1
    rot = u @ sign @ vt
    var_s = (s ** 2).sum() / len(src)
    scale = float(np.trace(np.diag(sig) @ sign) / var_s) if var_s > 0 else 1.0
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def align_face(image: np.ndarray, landmarks: np.ndarray, scheme: str = "arcface5",
               size: int = CROP_SIZE, frame: str = "arcface112") -> np.ndarray:
    """Warp the face with ``landmarks`` (5, 2) in ``image`` (H, W, 3 uint8) to a ``size`` crop
    of face frame ``frame`` (``FRAMES``); pixels outside the image are black. Faces are turned
    upright (similarity) except in ``UPRIGHT_FRAMES``, whose crops keep the photo's orientation
    and are cut by ``upright_crop`` (one antialiased resampling)."""
    if frame in UPRIGHT_FRAMES:
        return upright_crop(image, scale_shift(landmarks, frame_template(scheme, frame, size)), size)
    m = umeyama(landmarks, frame_template(scheme, frame, size))
    # PIL wants the inverse map (output pixel -> input pixel).
    inv = np.linalg.inv(np.vstack([m, [0.0, 0.0, 1.0]]))[:2]
    img = Image.fromarray(np.ascontiguousarray(image))
    out = img.transform((size, size), Image.Transform.AFFINE, data=tuple(inv.ravel()),
                        resample=Image.Resampling.BILINEAR)
    return np.asarray(out)


def upright_crop(image: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    """The ``size`` px square that scale + shift ``m`` (2x3, no rotation) maps the photo onto, cut
    and resized in one Lanczos step, antialiased when it shrinks (pixels outside: black).

    Why not an affine warp: PIL's warp samples without antialiasing, and a warp to 112 px followed
    by a resize to a 48 px model input blurs twice. On the 1,437 held-out FER2013 train faces pasted
    into photos (benchmarks/pasted_faces.py --split), this one-step crop raised the predict path's
    accuracy by 0.6-2.8 points for three of four bundled-model members (docs/inference.md).
    """
    s, tx, ty = float(m[0, 0]), float(m[0, 2]), float(m[1, 2])
    if s <= 0:
        raise ValueError(f"need a positive scale, got {s}")
    left, top, right, bottom = -tx / s, -ty / s, (size - tx) / s, (size - ty) / s
    img = Image.fromarray(np.ascontiguousarray(image))
    pad = int(np.ceil(max(0.0, -left, -top, right - img.width, bottom - img.height)))
    if pad > 0:  # the box leaves the photo: black border, as the warp gives
        framed = Image.new(img.mode, (img.width + 2 * pad, img.height + 2 * pad))
        framed.paste(img, (pad, pad))
        img, left, top, right, bottom = framed, left + pad, top + pad, right + pad, bottom + pad
    return np.asarray(img.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, right, bottom)))


def box_frame_matrix(box: np.ndarray, offsets: tuple[float, float, float], size: int) -> np.ndarray:
    """Scale + shift (2x3) mapping the crop that ``offsets`` (a ``BOX_FRAMES`` entry) places around
    ``box`` (x1, y1, x2, y2) onto a ``size`` px square."""
    x1, y1, x2, y2 = (float(v) for v in box)
    b = np.sqrt(max(x2 - x1, 1e-6) * max(y2 - y1, 1e-6))
    side = b * np.exp(offsets[0])
    cx, cy = (x1 + x2) / 2 + offsets[1] * b, (y1 + y2) / 2 + offsets[2] * b
    s = size / side
    return np.array([[s, 0.0, -(cx - side / 2) * s], [0.0, s, -(cy - side / 2) * s]])


def crop_face(image: np.ndarray, face, size: int = CROP_SIZE, frame: str = "arcface112") -> np.ndarray:
    """The crop of ``face`` (a detectors.Face) in ``frame``: the image itself for ``whole`` faces; in
    upright frames cut from the detector's box where ``BOX_FRAMES`` knows its boxes, else from the
    landmarks (``align_face``)."""
    if face.scheme == "whole":
        return image
    offsets = BOX_FRAMES.get(frame, {}).get(getattr(face, "detector", ""))
    if frame in UPRIGHT_FRAMES and offsets is not None:
        return upright_crop(image, box_frame_matrix(face.box, offsets, size), size)
    return align_face(image, face.landmarks, face.scheme, size, frame)
