"""From a trained model to predictions: ``Predictor``, ``predict_media``, ONNX export, ABAW files.

Kept out of ``import semifer``'s eager imports; ``semifer.Predictor`` loads it on first use.
"""
from semifer.infer.predictor import Prediction, Predictor

__all__ = ["Prediction", "Predictor"]
