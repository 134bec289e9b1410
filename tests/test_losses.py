"""Labeled-loss imbalance options and the masked unlabeled loss."""
import math

import pytest
import torch
import torch.nn.functional as F

from semifer.config import SSLConfig
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


def test_label_smoothing_matches_the_hand_computed_mixed_target_and_reaches_the_algorithm():
    from semifer.ssl import build_algorithm

    logits = torch.tensor([[2.0, 0.0, -1.0]])
    y = torch.tensor([0])
    e = 0.1
    logp = logits.log_softmax(1)[0]
    # target: (1 - e) on the true class + e / C on every class
    expected = -((1 - e) * logp[0] + (e / 3) * logp.sum()).item()
    counts = torch.tensor([5, 3, 2])
    assert supervised_loss(logits, y, counts, "none", e).item() == pytest.approx(expected, rel=1e-6)
    assert supervised_loss(logits, y, counts, "none", e).item() > supervised_loss(logits, y, counts).item()
    algo = build_algorithm(SSLConfig(algorithm="supervised"), 3, counts, None, label_smoothing=e)
    assert algo.labeled_loss(logits, y).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        build_algorithm(SSLConfig(algorithm="supervised"), 3, counts, None, label_smoothing=1.0)


def test_masked_loss_averages_over_all_unlabeled_samples():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    pseudo = torch.tensor([0, 0])
    mask = torch.tensor([1.0, 0.0])
    expected = F.cross_entropy(logits[:1], pseudo[:1]).item() / 2
    assert masked_pseudo_label_loss(logits, pseudo, mask).item() == pytest.approx(expected)


def test_fairness_loss_is_zero_without_accepted_samples():
    p_model = torch.tensor([0.5, 0.5])
    hist = torch.tensor([0.5, 0.5])
    none = freematch_fairness_loss(torch.randn(4, 2), torch.zeros(4), p_model, hist)
    assert none.item() == 0.0


def test_fairness_loss_matches_published_sign_on_a_hand_computed_example():
    """L_f = -H(SumNorm(p_t/h_t), SumNorm(pbar/hbar)) = + sum_c target_c * log batch_c (FreeMatch eq. 11)."""
    p_model = torch.tensor([0.5, 0.3, 0.2])
    label_hist = torch.tensor([0.5, 0.25, 0.25])
    # target: p_t / h_t = [1, 1.2, 0.8] (sum 3) -> [1/3, 0.4, 0.8/3]
    target = [1 / 3, 0.4, 0.8 / 3]
    # three accepted strong views with softmax [0.6, 0.3, 0.1], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]
    # (argmax 0, 1, 2) and one rejected sample that must not count
    accepted = torch.tensor([[6.0, 3.0, 1.0], [1.0, 2.0, 1.0], [1.0, 1.0, 2.0]]).log()
    logits = torch.cat([accepted, torch.tensor([[9.0, 0.0, 0.0]])])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    # pbar = [1.1, 1.05, 0.85] / 3, hbar = [1, 1, 1] / 3 -> pbar / hbar = [1.1, 1.05, 0.85] (sum 3)
    batch = [1.1 / 3, 1.05 / 3, 0.85 / 3]
    expected = sum(t * math.log(b) for t, b in zip(target, batch))  # = -H(target, batch) ~ -1.0907
    assert expected == pytest.approx(-1.09066, abs=1e-4)
    got = freematch_fairness_loss(logits, mask, p_model, label_hist)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_freematch_uses_the_published_fairness_weight_by_default():
    # USB's FreeMatch configs (config/classic_cv/freematch/*.yaml): ent_loss_ratio: 0.001
    assert SSLConfig().fairness_weight == 0.001
    assert SSLConfig(fairness_weight=0).fairness_weight == 0  # the variant without the term
