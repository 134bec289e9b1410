"""Metrics (ABAW macro-F1 over a fixed label list) and model scoring."""
from semifer.eval.metrics import classification_scores, confusion_matrix, scores_from_confusion

__all__ = ["classification_scores", "confusion_matrix", "scores_from_confusion"]
