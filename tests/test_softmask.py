"""Class-wise soft pseudo-label weights (ssl/softmask.py) and their use by the algorithms."""
import math

import torch

from semifer.config import SSLConfig
from semifer.ssl.algorithms import build_algorithm
from semifer.ssl.softmask import SoftMask


def test_weights_are_one_above_threshold_and_gaussian_below():
    sm = SoftMask(3, momentum=0.0)
    sm.conf_var.copy_(torch.tensor([0.01, 0.04, 0.01]))
    conf = torch.tensor([0.9, 0.7, 0.5, 0.5])
    pred = torch.tensor([0, 0, 1, 2])
    thr = torch.tensor([0.8, 0.7, 0.6])
    w = sm.weights(conf, pred, thr)
    expected = [1.0, math.exp(-0.01 / 0.02), math.exp(-0.04 / 0.08), math.exp(-0.01 / 0.02)]
    assert torch.allclose(w, torch.tensor(expected), atol=1e-6)


def test_statistics_track_per_class_variance_and_leave_unseen_classes_alone():
    sm = SoftMask(3, momentum=0.0, init_var=0.5)
    conf = torch.tensor([0.2, 0.4, 0.9, 0.9, 0.7])
    pred = torch.tensor([0, 0, 1, 1, 1])
    sm.update(conf, pred)
    assert torch.allclose(sm.conf_mean[:2], torch.tensor([0.3, 2.5 / 3]), atol=1e-6)
    assert torch.allclose(sm.conf_var[:2], torch.tensor([conf[:2].var(unbiased=False), conf[2:].var(unbiased=False)]),
                          atol=1e-6)
    assert sm.conf_var[2] == 0.5  # class 2 not predicted in this batch: unchanged
    sm.update(torch.tensor([float("nan"), 0.3]), torch.tensor([2, 0]))  # a NaN row never reaches a buffer
    assert torch.isfinite(sm.conf_var).all() and sm.conf_var[2] == 0.5


def test_soft_mask_gives_below_threshold_samples_weight_and_is_checkpointed():
    torch.manual_seed(0)
    counts = torch.tensor([5, 3, 2, 2, 9, 2, 2, 0])
    net = torch.nn.Linear(4, 8)
    batch = {"x_l": torch.randn(4, 4), "y_l": torch.tensor([0, 1, 4, 4]), "x_uw": torch.randn(32, 4),
             "x_us": torch.randn(32, 4), "idx_u": None}
    hard = build_algorithm(SSLConfig(algorithm="dtm_flex", status_mode="streamed"), 8, counts, None)
    soft = build_algorithm(SSLConfig(algorithm="dtm_flex", status_mode="streamed", soft_mask=True), 8, counts, None)
    _, logs_h = hard.step(net, net, batch, 5)
    _, logs_s = soft.step(net, net, batch, 5)
    assert logs_h["mask_rate"] == 0  # an untrained net is never above tau_min 0.8
    assert 0 < logs_s["mask_rate"] < 1
    assert {"soft_mask.conf_mean", "soft_mask.conf_var"} <= set(soft.state_dict())


def test_adaptive_margin_changes_only_the_unlabeled_loss():
    torch.manual_seed(0)
    counts = torch.tensor([5, 3, 2, 2, 9, 2, 2, 0])
    net = torch.nn.Linear(4, 8)
    batch = {"x_l": torch.randn(4, 4), "y_l": torch.tensor([0, 1, 4, 4]), "x_uw": torch.randn(32, 4),
             "x_us": torch.randn(32, 4), "idx_u": None}
    base = dict(algorithm="dtm_flex", status_mode="streamed", soft_mask=True, distribution_alignment=True)
    plain = build_algorithm(SSLConfig(**base), 8, counts, None)
    margin = build_algorithm(SSLConfig(**base, adaptive_margin=1.0), 8, counts, None)
    for a in (plain, margin):  # a skewed running prior, so log(pbar) is not constant
        a.alignment.running.copy_(torch.tensor([0.5, 0.1, 0.1, 0.05, 0.1, 0.1, 0.05, 0.0]))
    _, lp = plain.step(net, net, batch, 5)
    _, lm = margin.step(net, net, batch, 5)
    assert torch.equal(lp["loss_x"], lm["loss_x"])
    assert not torch.allclose(lp["loss_u"], lm["loss_u"])
