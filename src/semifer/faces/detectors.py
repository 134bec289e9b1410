"""Face detectors with five landmarks, one registry entry each (``semifer detectors``).

A detector is built as ``DETECTORS.get(name)(**options)`` and called on an RGB uint8
image (H, W, 3); it returns :class:`Face` records sorted by score. Heavy libraries
(dlib, onnxruntime) are imported when a detector is built, never at package import.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from semifer.registry import DETECTORS


@dataclass
class Face:
    """One detected face: ``box`` = (x1, y1, x2, y2) pixels, ``landmarks`` (5, 2) in ``scheme``;
    ``detector``: the registered detector that drew the box (each draws its boxes its own way:
    ``faces/align.py`` ``BOX_FRAMES`` places a data set's crops relative to each one's boxes)."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray
    scheme: str
    detector: str = ""


def default_detector() -> str:
    """``mtcnn`` where facenet-pytorch is installed (it finds more faces than dlib's HOG, and
    tracks faces through video), else ``dlib``."""
    return "mtcnn" if importlib.util.find_spec("facenet_pytorch") is not None else "dlib"


def build_detector(name: str = "auto", **options):
    """The registered detector ``name`` built with ``options`` (``auto``: :func:`default_detector`;
    unknown names list the known ones)."""
    return DETECTORS.get(default_detector() if name == "auto" else name)(**options)


def _missing(package: str, pip_name: str) -> ImportError:
    return ImportError(f"the face detector needs {package}: pip install {pip_name} (or pip install 'semifer[faces]')")


def dlib_model_path(name: str = "shape_predictor_5_face_landmarks.dat") -> Path:
    """Path of a dlib model file shipped in the ``face_recognition_models`` package.

    The package is located without importing it: its ``__init__`` needs ``pkg_resources``,
    which current setuptools no longer has.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise _missing("face_recognition_models (dlib's landmark model)", "face_recognition_models")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the face_recognition_models package")
    return path


@lru_cache(maxsize=4)
def _dlib_models(predictor: str):
    try:
        import dlib
    except ImportError:
        raise _missing("dlib", "dlib-bin") from None
    return dlib, dlib.get_frontal_face_detector(), dlib.shape_predictor(predictor)


@DETECTORS.register("dlib")
class DlibDetector:
    """dlib's HOG frontal-face detector + its 5-point landmark model (offline, CPU)."""

    scheme = "dlib5"

    # threshold: dlib's SVM margin; 0.3 rather than dlib's 0 because a round mission patch
    # on skimage's astronaut photo scores 0.12 (her face: 1.16). upsample=1 finds faces
    # down to about 40 px at four times the cost of upsample=0 (80 px).
    def __init__(self, threshold: float = 0.3, upsample: int = 1, max_side: int = 1024,
                 predictor: str | None = None) -> None:
        self.threshold, self.upsample, self.max_side = float(threshold), int(upsample), int(max_side)
        self.dlib, self.detector, self.predictor = _dlib_models(str(predictor or dlib_model_path()))

    def __call__(self, image: np.ndarray) -> list[Face]:
        image = np.ascontiguousarray(image)
        h, w = image.shape[:2]
        # HOG cost grows with pixels; big frames are searched at a reduced size, the
        # landmarks are then fitted on the full-resolution image.
        scale = min(1.0, self.max_side / max(h, w))
        small = image if scale == 1.0 else np.asarray(
            Image.fromarray(image).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR))
        rects, scores, _ = self.detector.run(small, self.upsample, self.threshold)
        faces = []
        for r, s in zip(rects, scores):
            box = np.array([r.left(), r.top(), r.right(), r.bottom()], np.float64) / scale
            rect = self.dlib.rectangle(*(int(round(v)) for v in box))
            shape = self.predictor(image, rect)
            lm = np.array([(p.x, p.y) for p in shape.parts()], np.float64)
            faces.append(Face(box, float(s), lm, self.scheme, "dlib"))
        return sorted(faces, key=lambda f: -f.score)


@lru_cache(maxsize=4)
def _dlib_cnn_model(weights: str):
    try:
        import dlib
    except ImportError:
        raise _missing("dlib", "dlib-bin") from None
    return dlib.cnn_face_detection_model_v1(weights)


@DETECTORS.register("dlib_cnn")
class DlibCnnDetector:
    """dlib's CNN (MMOD) face detector + its 5-point landmark model (offline, CPU; slower than HOG).

    Weights (``mmod_human_face_detector.dat``) from ``face_recognition_models``, like the
    landmark model; cost and found rates in docs/inference.md.
    """

    scheme = "dlib5"

    # threshold: MMOD's confidence; dlib itself drops detections below 0, so lower values do
    # nothing. 0 rather than a margin like HOG's 0.3: the round mission patch on skimage's
    # astronaut photo is not returned at any scale (0.6x-2x, upsample 0 and 1; her face scores
    # 1.05-1.07), nor is anything on 18 faceless skimage pictures, upright and turned 30 degrees
    # either way, while 2 of 100 pasted FER2013 faces it finds score 0.12 and 0.24.
    # upsample=0: its 80 px window finds faces down to about 80 px (upsample=1: about 40 px at
    # four times the cost; 512x512 on one thread of a busy machine: 3.4 s vs 13.7 s).
    # max_side: the network's cost grows with pixels; big frames are searched smaller, the
    # landmarks fitted at full size.
    def __init__(self, threshold: float = 0.0, upsample: int = 0, max_side: int = 1024,
                 weights: str | None = None, predictor: str | None = None) -> None:
        self.threshold, self.upsample, self.max_side = float(threshold), int(upsample), int(max_side)
        try:
            path = Path(weights) if weights else dlib_model_path("mmod_human_face_detector.dat")
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist")
        except FileNotFoundError as e:
            raise FileNotFoundError(f"the dlib_cnn detector needs dlib's MMOD weights: {e} (pip install "
                                    "--force-reinstall face_recognition_models, or the option weights=PATH)") from None
        self.dlib, _, self.predictor = _dlib_models(str(predictor or dlib_model_path()))
        self.net = _dlib_cnn_model(str(path))

    def __call__(self, image: np.ndarray) -> list[Face]:
        image = np.ascontiguousarray(image)
        h, w = image.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        small = image if scale == 1.0 else np.asarray(
            Image.fromarray(image).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR))
        faces = []
        for d in self.net(np.ascontiguousarray(small), self.upsample):
            if d.confidence < self.threshold:
                continue
            r = d.rect
            box = np.array([r.left(), r.top(), r.right(), r.bottom()], np.float64) / scale
            shape = self.predictor(image, self.dlib.rectangle(*(int(round(v)) for v in box)))
            lm = np.array([(p.x, p.y) for p in shape.parts()], np.float64)
            faces.append(Face(box, float(d.confidence), lm, self.scheme, "dlib_cnn"))
        return sorted(faces, key=lambda f: -f.score)


@DETECTORS.register("whole")
class WholeImage:
    """No detection: the whole image is one face (already-aligned crops, e.g. ``semifer prepare``'s)."""

    scheme = "whole"  # the predictor classifies the image as it is, no alignment

    def __call__(self, image: np.ndarray) -> list[Face]:
        h, w = image.shape[:2]
        return [Face(np.array([0.0, 0.0, w, h]), 1.0, np.zeros((5, 2)), self.scheme, "whole")]


def detect_rotated(detector, image: np.ndarray, angles: tuple[float, ...] = (30.0, -30.0, 60.0, -60.0)) -> list[Face]:
    """Faces of ``image`` found by ``detector`` on copies turned by each angle (degrees, the first
    that finds any wins), mapped back to ``image``: heads tilted beyond what a detector was
    trained on (FER2013 has many) are found upright. A box keeps its size, centred where its
    centre turns back to."""
    h, w = image.shape[:2]
    centre = np.array([w / 2.0, h / 2.0])
    for angle in angles:
        turned = Image.fromarray(np.ascontiguousarray(image)).rotate(angle, resample=Image.BILINEAR, expand=True)
        faces = detector(np.asarray(turned))
        if not faces:
            continue
        # PIL turns counter-clockwise by `angle` about the centre and grows the canvas (expand);
        # map points of the turned canvas back: un-shift, turn back, re-shift.
        t = np.deg2rad(angle)
        back = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
        tc = np.array([turned.width / 2.0, turned.height / 2.0])

        def unturn(p: np.ndarray) -> np.ndarray:
            return (p - tc) @ back.T + centre

        out = []
        for f in faces:
            # the box keeps its width and height around its turned-back centre: the bounds of the
            # turned box would be up to 1.41x larger than the face, and crops cut from the box
            # (align.py BOX_FRAMES) would come out that much too loose
            x1, y1, x2, y2 = f.box
            cx, cy = unturn(np.array([(x1 + x2) / 2, (y1 + y2) / 2]))
            hw, hh = (x2 - x1) / 2, (y2 - y1) / 2
            out.append(Face(np.array([cx - hw, cy - hh, cx + hw, cy + hh]), f.score, unturn(f.landmarks), f.scheme, f.detector))
        return out
    return []


def _nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    import torch
    from torchvision.ops import nms

    return nms(torch.from_numpy(boxes).float(), torch.from_numpy(scores).float(), iou).numpy()


def decode_scrfd(outputs: list[np.ndarray], input_hw: tuple[int, int], threshold: float = 0.5,
                 nms_iou: float = 0.4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes (N, 4), scores (N,), landmarks (N, 5, 2) in input pixels from SCRFD's raw outputs.

    ``outputs`` in insightface's order: scores, box distances, landmark offsets, each per
    stride (8, 16, 32 with two anchors, or five strides with one anchor); a leading batch
    dimension of 1 is dropped. Distances are in units of the stride.
    """
    outs = [np.asarray(o, np.float32).reshape(-1, np.asarray(o).shape[-1]) for o in outputs]
    if len(outs) == 9:
        strides, anchors = (8, 16, 32), 2
    elif len(outs) == 15:
        strides, anchors = (8, 16, 32, 64, 128), 1
    else:
        raise ValueError(f"expected 9 or 15 SCRFD outputs (scores, boxes, landmarks per stride), got {len(outs)}")
    n = len(strides)
    boxes, scores, kps = [], [], []
    for i, stride in enumerate(strides):
        sc, bb, kp = outs[i][:, 0], outs[i + n] * stride, outs[i + 2 * n] * stride
        gh, gw = input_hw[0] // stride, input_hw[1] // stride
        if len(sc) != gh * gw * anchors or bb.shape[1] != 4 or kp.shape[1] != 10:
            raise ValueError(f"SCRFD stride {stride}: got {len(sc)} scores, boxes {bb.shape}, landmarks {kp.shape} "
                             f"for a {input_hw[0]}x{input_hw[1]} input ({gh * gw * anchors} anchors expected)")
        ys, xs = np.mgrid[:gh, :gw]
        centers = np.repeat(np.stack([xs, ys], -1).reshape(-1, 2) * stride, anchors, axis=0).astype(np.float32)
        keep = sc >= threshold
        c = centers[keep]
        d = bb[keep]
        boxes.append(np.concatenate([c - d[:, :2], c + d[:, 2:]], 1))
        kps.append(c[:, None, :] + kp[keep].reshape(-1, 5, 2))
        scores.append(sc[keep])
    boxes, scores, kps = np.concatenate(boxes), np.concatenate(scores), np.concatenate(kps)
    if len(scores) == 0:
        return boxes.reshape(0, 4), scores, kps.reshape(0, 5, 2)
    keep = _nms(boxes, scores, nms_iou)
    return boxes[keep], scores[keep], kps[keep]


@DETECTORS.register("scrfd")
class ScrfdDetector:
    """SCRFD (insightface) from a user-supplied .onnx file through onnxruntime (option model=PATH)."""

    scheme = "arcface5"

    def __init__(self, model: str | None = None, threshold: float = 0.5, nms: float = 0.4,
                 input_size: int = 640, threads: int = 0) -> None:
        if not model:
            raise ValueError("the scrfd detector needs its model file: --detector-model PATH.onnx "
                             "(e.g. insightface's det_10g.onnx or scrfd_500m_kps.onnx)")
        if not Path(model).is_file():
            raise FileNotFoundError(f"no SCRFD model at {model}")
        try:
            import onnxruntime as ort
        except ImportError:
            raise _missing("onnxruntime", "onnxruntime") from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        h, w = inp.shape[2:4]
        # A model exported with a fixed input size dictates it; dynamic ones use input_size.
        self.input_hw = (h if isinstance(h, int) else int(input_size), w if isinstance(w, int) else int(input_size))
        self.threshold, self.nms = float(threshold), float(nms)

    def __call__(self, image: np.ndarray) -> list[Face]:
        h, w = image.shape[:2]
        ih, iw = self.input_hw
        scale = min(ih / h, iw / w)
        nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
        canvas = np.zeros((ih, iw, 3), np.float32)  # letterbox: image top-left, zero padding
        canvas[:nh, :nw] = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR), np.float32)
        blob = ((canvas - 127.5) / 128.0).transpose(2, 0, 1)[None]
        outs = self.session.run(None, {self.input_name: np.ascontiguousarray(blob)})
        boxes, scores, kps = decode_scrfd(outs, (ih, iw), self.threshold, self.nms)
        return [Face(b.astype(np.float64) / scale, float(s), k.astype(np.float64) / scale, self.scheme, "scrfd")
                for b, s, k in sorted(zip(boxes, scores, kps), key=lambda t: -t[1])]


@DETECTORS.register("mtcnn")
class MtcnnDetector:
    """MTCNN (Zhang et al. 2016) from facenet-pytorch, its weights shipped in that wheel (offline, CPU).

    Five landmarks in ArcFace's order. ``refine`` re-fits faces of the previous video frame
    with MTCNN's last network alone (one 48x48 crop per face, ~1 ms), so a video needs the
    full image pyramid only every few frames (``semifer predict --detect-every``).
    """

    scheme = "arcface5"

    # min_face 40: smaller faces carry little expression at 48 px; the pyramid's cost grows
    # fast below that (640x480: 330 ms at 20 px, 175 ms at 40, 107 ms at 80 on one thread).
    # retry: an image where the usual cascade finds nothing is searched once more with looser
    # stage thresholds (docs/inference.md: found 87.8 % -> 92.5 % of pasted FER2013 faces); the
    # second pass costs time only on images without a face.
    def __init__(self, threshold: float = 0.9, min_face: int = 40, max_side: int = 1024,
                 stage_thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
                 retry_threshold: float | None = 0.8,
                 retry_stage_thresholds: tuple[float, float, float] = (0.5, 0.5, 0.5)) -> None:
        try:
            from facenet_pytorch import MTCNN
        except ImportError:
            raise ImportError("the mtcnn detector needs facenet-pytorch: pip install --no-deps "
                              "facenet-pytorch==2.6.0 requests (make install does)") from None
        self.threshold, self.max_side = float(threshold), int(max_side)
        self.stage_thresholds = [float(t) for t in stage_thresholds]
        self.retry_threshold = None if retry_threshold is None else float(retry_threshold)
        self.retry_stage_thresholds = [float(t) for t in retry_stage_thresholds]
        self.net = MTCNN(keep_all=True, device="cpu", min_face_size=int(min_face),
                         thresholds=self.stage_thresholds, post_process=False)

    def __call__(self, image: np.ndarray) -> list[Face]:
        h, w = image.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        small = np.ascontiguousarray(image if scale == 1.0 else np.asarray(
            Image.fromarray(image).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)))
        faces = self._detect(small, scale, self.stage_thresholds, self.threshold)
        if not faces and self.retry_threshold is not None:
            faces = self._detect(small, scale, self.retry_stage_thresholds, self.retry_threshold)
        return faces

    def _detect(self, small: np.ndarray, scale: float, stages: list[float], threshold: float) -> list[Face]:
        self.net.thresholds = stages
        try:
            boxes, probs, points = self.net.detect(small, landmarks=True)
        finally:
            self.net.thresholds = self.stage_thresholds
        if boxes is None:
            return []
        faces = [Face(np.asarray(b, np.float64) / scale, float(p), np.asarray(k, np.float64) / scale, self.scheme, "mtcnn")
                 for b, p, k in zip(boxes, probs, points) if p >= threshold]
        return sorted(faces, key=lambda f: -f.score)

    def refine(self, image: np.ndarray, faces: list[Face]) -> list[Face]:
        """Faces re-fitted in ``image`` from their boxes in an earlier frame (lost ones dropped)."""
        import torch
        import torch.nn.functional as F

        if not faces:
            return []
        h, w = image.shape[:2]
        crops, squares = [], []
        for f in faces:
            x1, y1, x2, y2 = f.box
            side = max(x2 - x1, y2 - y1)
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            sq = np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2])
            a = np.clip(np.round(sq).astype(int), 0, [w, h, w, h])
            if a[2] - a[0] < 8 or a[3] - a[1] < 8:
                continue
            crop = torch.from_numpy(np.ascontiguousarray(image[a[1]:a[3], a[0]:a[2]])).permute(2, 0, 1)[None].float()
            crops.append(F.interpolate(crop, size=(48, 48), mode="area"))
            squares.append(a.astype(np.float64))
        if not crops:
            return []
        with torch.inference_mode():
            reg, pts, prob = self.net.onet((torch.cat(crops) - 127.5) * 0.0078125)
        out = []
        for a, r, p, s in zip(squares, reg.numpy(), pts.numpy(), prob[:, 1].numpy()):
            if s < self.threshold:
                continue
            bw, bh = a[2] - a[0], a[3] - a[1]
            lm = np.stack([a[0] + bw * p[:5], a[1] + bh * p[5:]], 1)
            box = a + r * np.array([bw, bh, bw, bh])
            out.append(Face(box, float(s), lm, self.scheme, "mtcnn"))
        return sorted(out, key=lambda f: -f.score)
