"""Faces from raw media: detectors (registry ``DETECTORS``), 5-point alignment, ``prepare``."""
from semifer.faces import detectors  # noqa: F401  (registers detectors)
from semifer.faces.align import align_face
from semifer.faces.detectors import Face, build_detector

__all__ = ["Face", "align_face", "build_detector", "detectors"]
