"""Labeled-loss imbalance options and the masked unlabeled loss."""
import math

import pytest
import torch
import torch.nn.functional as F

from semifer.ssl.losses import freematch_fairness_loss, masked_pseudo_label_loss, supervised_loss


def test_logit_adjustment_adds_log_prior():
    logits = torch.zeros(2, 3)
    y = torch.tensor([0, 2])
    counts = torch.tensor([6, 3, 1])
    loss = supervised_loss(logits, y, counts, "logit_adjust")
    prior = (counts + 1e-3) / (counts + 1e-3).sum()
    assert loss.item() == pytest.approx(F.cross_entropy(prior.log().expand(2, 3), y).item())
    # a rare-class target costs more than a frequent one at equal logits
    assert supervised_loss(logits[:1], torch.tensor([2]), counts, "logit_adjust") > \
        supervised_loss(logits[:1], torch.tensor([0]), counts, "logit_adjust")


def test_class_balanced_weights_are_inverse_frequency():
    logits = torch.zeros(2, 3)
    counts = torch.tensor([4, 1, 0])
    # weights 1/4 and 1, normalised to mean 1 over the 2 present classes: 0.4 and 1.6
    loss = supervised_loss(logits, torch.tensor([0, 1]), counts, "class_balanced")
    assert loss.item() == pytest.approx(math.log(3))  # weighted mean of equal CE values
    l0 = supervised_loss(logits[:1], torch.tensor([0]), counts, "class_balanced")
    assert l0.item() == pytest.approx(math.log(3))
    with pytest.raises(ValueError):
        supervised_loss(logits, torch.tensor([0, 1]), counts, "bogus")


def test_masked_loss_averages_over_all_unlabeled_samples():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    pseudo = torch.tensor([0, 0])
    mask = torch.tensor([1.0, 0.0])
    expected = F.cross_entropy(logits[:1], pseudo[:1]).item() / 2
    assert masked_pseudo_label_loss(logits, pseudo, mask).item() == pytest.approx(expected)


def test_fairness_loss_is_zero_without_accepted_samples_and_favours_diversity():
    p_model = torch.tensor([0.5, 0.5])
    hist = torch.tensor([0.5, 0.5])
    none = freematch_fairness_loss(torch.randn(4, 2), torch.zeros(4), p_model, hist)
    assert none.item() == 0.0
    diverse = torch.tensor([[4.0, 0.0], [0.0, 4.0]])
    collapsed = torch.tensor([[4.0, 0.0], [4.0, 0.0]])
    ones = torch.ones(2)
    assert freematch_fairness_loss(diverse, ones, p_model, hist) < freematch_fairness_loss(collapsed, ones, p_model, hist)
