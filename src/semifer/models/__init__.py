"""Backbones (registry) and the classifier that wraps them."""
from semifer.models import backbones  # noqa: F401  (registers backbones)
from semifer.models import dlib_resnet, ensemble, evolve_ir, iresnet, mobilefacenet, zoo  # noqa: F401  (register too)
from semifer.models.classifier import Classifier, build_model

__all__ = ["Classifier", "build_model", "backbones"]
