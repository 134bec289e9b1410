"""Distribution alignment: teacher probabilities rescaled toward the labeled class prior."""
import pytest
import torch

from semifer.config import SSLConfig
from semifer.ssl.algorithms import build_algorithm
from semifer.ssl.alignment import DistributionAlignment


def test_alignment_moves_a_biased_teacher_to_the_target_prior():
    counts = torch.tensor([10, 10, 10, 10, 0])           # last class has no labels
    da = DistributionAlignment(counts, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    # A teacher that puts most mass on class 0.
    logits = torch.randn(4000, 5, generator=g) + torch.tensor([2.0, 0.0, 0.0, 0.0, 0.5])
    probs = logits.softmax(1)
    for chunk in probs.split(200):
        out = da(chunk)
    assert torch.allclose(out.sum(1), torch.ones(len(out)), atol=1e-5)
    assert torch.all(out[:, 4] == 0)                     # unlabeled-prior class is never pseudo-labelled
    aligned_mean = da(probs).mean(0)
    raw_mean = probs.mean(0)
    # Raw: class 0 dominates; aligned: much closer to the uniform target over the 4 labeled
    # classes (one rescaling plus per-sample renormalisation is not an exact projection).
    target = torch.tensor([0.25, 0.25, 0.25, 0.25, 0.0])
    assert raw_mean[0] > 0.4
    assert (aligned_mean - target).abs().sum() < 0.5 * (raw_mean - target).abs().sum()
    assert aligned_mean[0] < raw_mean[0] and torch.all(aligned_mean[1:4] > raw_mean[1:4])
    assert da.running[0] > 0.4 and da.running[4] > 0.1   # it tracks the raw teacher, not the target


def test_alignment_is_a_checkpointed_buffer_and_rejects_bad_momentum():
    da = DistributionAlignment(torch.tensor([1, 3]))
    assert set(da.state_dict()) == {"target", "running"}
    with pytest.raises(ValueError):
        DistributionAlignment(torch.tensor([1, 3]), momentum=1.0)
    with pytest.raises(ValueError):
        DistributionAlignment(torch.tensor([0, 0]))


@pytest.mark.parametrize("name,setting,expected", [("dtm", "auto", False), ("dtm_flex", True, True), ("fixmatch", "auto", False),
                                                   ("fixmatch", True, True), ("dtm", False, False)])
def test_alignment_default_follows_the_algorithm(name, setting, expected):
    cfg = SSLConfig(algorithm=name, distribution_alignment=setting)
    algo = build_algorithm(cfg, 8, torch.ones(8, dtype=torch.long), num_unlabeled=100)
    assert (algo.alignment is not None) == expected
    assert any(k.startswith("alignment.") for k in algo.state_dict()) == expected


def test_uniform_target_is_balanced_over_labeled_classes():
    da = DistributionAlignment(torch.tensor([30, 10, 0, 60]), target="uniform")
    assert torch.allclose(da.target, torch.tensor([1 / 3, 1 / 3, 0.0, 1 / 3]))
    with pytest.raises(ValueError):
        DistributionAlignment(torch.tensor([1, 1]), target="balanced")


def test_nonfinite_teacher_rows_do_not_reach_the_running_mean():
    da = DistributionAlignment(torch.tensor([1, 1, 1]), momentum=0.5)
    probs = torch.tensor([[0.8, 0.1, 0.1], [float("nan"), 0.5, 0.5]])
    da(probs)
    assert torch.isfinite(da.running).all()
    assert torch.allclose(da.running, 0.5 * torch.full((3,), 1 / 3) + 0.5 * torch.tensor([0.8, 0.1, 0.1]))
    before = da.running.clone()
    da(torch.full((2, 3), float("inf")))            # nothing finite: the buffer is left alone
    assert torch.equal(da.running, before)


def test_dtm_refuses_alignment_and_soft_mask():
    # DTM's thresholds hold for calibrated probabilities; both options act on raw ones.
    for kw in ({"distribution_alignment": True}, {"soft_mask": True}):
        with pytest.raises(ValueError, match="does not combine"):
            build_algorithm(SSLConfig(algorithm="dtm", **kw), 8, torch.ones(8, dtype=torch.long), num_unlabeled=100)
