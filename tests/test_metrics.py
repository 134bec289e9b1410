"""The ABAW metric on a hand-worked example with absent classes."""
import pytest
import torch

from semifer.eval.metrics import classification_scores


def test_macro_f1_counts_absent_classes_as_zero():
    y_true = torch.tensor([0, 0, 1, 1, 2])
    y_pred = torch.tensor([0, 1, 1, 1, 2])
    s = classification_scores(y_true, y_pred)
    # class 0: P=1, R=1/2 -> 2/3; class 1: P=2/3, R=1 -> 4/5; class 2: 1; classes 3..7 absent -> 0
    assert s["per_class_f1"]["Neutral"] == pytest.approx(2 / 3)
    assert s["per_class_f1"]["Anger"] == pytest.approx(0.8)
    assert s["per_class_f1"]["Disgust"] == pytest.approx(1.0)
    assert s["per_class_f1"]["Other"] == 0.0
    assert s["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 1.0) / 8)
    assert s["accuracy"] == pytest.approx(0.8)
    assert s["confusion"][0][:2] == [1, 1] and s["confusion"][1][:2] == [0, 2]


def test_matches_sklearn_when_available():
    sk = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    y_true = torch.randint(0, 6, (300,), generator=g)  # classes 6 and 7 never occur
    y_pred = torch.where(torch.rand(300, generator=g) < 0.6, y_true, torch.randint(0, 8, (300,), generator=g))
    s = classification_scores(y_true, y_pred)
    ref = sk.f1_score(y_true.numpy(), y_pred.numpy(), labels=list(range(8)), average="macro", zero_division=0)
    assert s["macro_f1"] == pytest.approx(ref)
