"""``semifer.Predictor``: faces and expression probabilities for one image.

>>> p = semifer.Predictor()                        # the bundled model (semifer models)
>>> p = semifer.Predictor("runs/mine")            # or a checkpoint file, model.onnx, a bundled name
>>> r = p.predict("photo.jpg")                     # path, PIL image or RGB uint8 array
>>> r.boxes, r.probs, r.labels                     # (N, 4), (N, 8), ["Happiness", ...]

Faces are found by a registered detector, aligned by their five landmarks to the face
frame the model was trained on (``data.face_frame``: ArcFace's 112 px frame as ``semifer
prepare`` writes it, or FER2013's tighter crops) and resized to the model's input size and
channels, the same way training images are decoded.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from semifer.data.decode import decode_image
from semifer.faces.align import CROP_SIZE, UPRIGHT_FRAMES, crop_face
from semifer.faces.detectors import Face, build_detector
from semifer.infer.onnx_export import load_classifier
from semifer.labels import ABAW_LABELS


@dataclass
class Prediction:
    """Faces of one image: boxes (N, 4) x1 y1 x2 y2, detector scores (N,), landmarks (N, 5, 2), probs (N, 8)."""

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray
    probs: np.ndarray

    @property
    def labels(self) -> list[str]:
        return [ABAW_LABELS[i] for i in self.probs.argmax(1)] if len(self.probs) else []

    def __len__(self) -> int:
        return len(self.boxes)


def as_rgb(image) -> np.ndarray:
    """A path, PIL image or array (H, W[, 1|3|4]) -> RGB uint8 (H, W, 3)."""
    if isinstance(image, (str, Path)):
        from semifer.faces.media import load_rgb

        arr, reason = load_rgb(image)
        if arr is None:
            raise ValueError(f"{image}: {reason}")
        return arr
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image array, got {arr.dtype}")
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 1):
        return np.repeat(arr.reshape(arr.shape[0], arr.shape[1], 1), 3, axis=2)
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return np.ascontiguousarray(arr[..., :3])
    raise ValueError(f"expected an (H, W), (H, W, 3) or (H, W, 4) image, got shape {arr.shape}")


# Photos where the detector finds no face are searched again on turned copies, then by dlib's CNN
# detector: on the 3,589 pasted fer2013/val faces this found 0.986 of the faces instead of 0.914
# (docs/inference.md). A face found on a turned copy must score 0.99: skimage's cat saved as a JPEG
# scores 0.96 turned 30 degrees (real pasted faces lost by 0.99 instead of 0.95: 0.4 %). It costs time only where nothing was found (about 3 s a photo on one core);
# video frames never take this path. () / None turn it off.
PHOTO_ROTATIONS: tuple[float, ...] = (30.0, -30.0, 60.0, -60.0)
PHOTO_FALLBACK: str | None = "dlib_cnn"


class Predictor:
    """Detector + aligned crops + classifier (torch checkpoint or exported ``.onnx``)."""

    def __init__(self, model: Path | str | None = None, detector: str = "auto", detector_options: dict | None = None,
                 device: str = "cpu", batch_size: int = 64, detect_every: int = 1,
                 rotations: tuple[float, ...] = PHOTO_ROTATIONS, rotated_min_score: float = 0.99,
                 fallback_detector: str | None = PHOTO_FALLBACK) -> None:
        from semifer.bundled import resolve_model

        model = resolve_model(model)
        self.classifier = load_classifier(model, device)
        self.model_path = str(getattr(self.classifier, "path", model))
        from semifer.faces.detectors import default_detector

        detector = default_detector() if detector == "auto" else detector
        self.detector_name, self.detector_options = detector, dict(detector_options or {})
        self.detector = build_detector(detector, **self.detector_options)
        self.batch_size = int(batch_size)
        # photos: where no face is found, look again on copies turned by these angles (tilted
        # heads); a face found that way must score rotated_min_score (turned copies of faceless
        # photos give the detector more chances to be wrong)
        self.rotations, self.rotated_min_score = tuple(float(r) for r in rotations), float(rotated_min_score)
        # photos: a second detector tried last where the first (and its rotations) found nothing
        # (e.g. dlib's HOG after mtcnn: they miss different faces)
        self.fallback_name = fallback_detector
        self.fallback = build_detector(fallback_detector) if fallback_detector and fallback_detector != detector else None
        # video: a full detection every N frames, faces re-fitted in between (detectors with refine)
        self.detect_every = max(1, int(detect_every))
        self.reset_tracking()

    def reset_tracking(self) -> None:
        """Forget the faces of earlier frames (a new video starts)."""
        self._tracked: list[Face] = []
        self._since_detect = 1 << 30

    def track(self, image: np.ndarray) -> tuple[list[Face], list[np.ndarray]]:
        """``detect`` for consecutive video frames: the detector runs every ``detect_every`` frames;
        in between the faces of the previous frame are re-fitted (``refine``), and a lost face
        brings the next full detection forward. Detectors without ``refine`` detect every frame."""
        refine = getattr(self.detector, "refine", None)
        if refine is None or self.detect_every == 1 or self._since_detect + 1 >= self.detect_every:
            faces, self._since_detect = self.detector(image), 0
        else:
            faces = refine(image, self._tracked)
            self._since_detect = self._since_detect + 1 if len(faces) == len(self._tracked) else 1 << 30
        self._tracked = faces
        return faces, self.crops(image, faces)

    def detect(self, image: np.ndarray) -> tuple[list[Face], list[np.ndarray]]:
        """Faces of an RGB image and their crops in the model's face frame (``crops``; ``whole``: the image itself)."""
        faces = self.detector(image)
        if not faces and self.rotations:
            from semifer.faces.detectors import detect_rotated

            faces = [f for f in detect_rotated(self.detector, image, self.rotations) if f.score >= self.rotated_min_score]
        if not faces and self.fallback is not None:
            faces = self.fallback(image)
        return faces, self.crops(image, faces)

    def crops(self, image: np.ndarray, faces: list[Face]) -> list[np.ndarray]:
        """The faces' crops in the model's face frame (``faces.align.crop_face``): 112 px, or, in frames
        cut upright (FER2013's), straight at the model's input size in one resampling, from the
        detector's box where its boxes were measured (``whole`` faces: the image itself)."""
        frame = getattr(self.classifier, "face_frame", "arcface112")
        size = int(self.classifier.image_size) if frame in UPRIGHT_FRAMES else CROP_SIZE
        return [crop_face(image, f, size, frame) for f in faces]

    def classify(self, crops: list[np.ndarray]) -> np.ndarray:
        """Probabilities (N, 8) for aligned RGB crops, ``batch_size`` at a time."""
        c = self.classifier
        if not crops:
            return np.zeros((0, len(ABAW_LABELS)), np.float32)
        out = []
        for start in range(0, len(crops), self.batch_size):
            x = np.stack([decode_image(crop, c.image_size, c.channels)[0] for crop in crops[start:start + self.batch_size]])
            out.append(c(x.astype(np.float32) / 255.0))
        return np.concatenate(out)

    def predict(self, image) -> Prediction:
        """Boxes, scores, landmarks and probabilities of every face in ``image``."""
        rgb = as_rgb(image)
        faces, crops = self.detect(rgb)
        return Prediction(np.array([f.box for f in faces]).reshape(-1, 4),
                          np.array([f.score for f in faces], np.float64),
                          np.array([f.landmarks for f in faces]).reshape(-1, 5, 2),
                          self.classify(crops))
