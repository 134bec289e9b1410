"""Threshold policies against hand-computed values (3 classes, small sets)."""
import pytest
import torch

from semifer.config import SSLConfig
from semifer.registry import ALGORITHMS, THRESHOLDS
from semifer.ssl.thresholds import LearningStatus


def one_hot_probs(pred, conf, C=3):
    """Probabilities whose argmax is ``pred`` with max value ``conf``, rest spread evenly."""
    p = torch.full((len(pred), C), 0.0)
    for i, (c, v) in enumerate(zip(pred, conf)):
        p[i] = (1 - v) / (C - 1)
        p[i, c] = v
    return p


def test_fixed_threshold_masks_by_confidence():
    pol = THRESHOLDS.get("fixed")(3, tau=0.9)
    mask, pseudo = pol.mask(one_hot_probs([0, 1, 2], [0.95, 0.5, 0.9]))
    assert mask.tolist() == [1.0, 0.0, 1.0]
    assert pseudo.tolist() == [0, 1, 2]


def test_indexed_status_bookkeeping_and_flexmatch_thresholds():
    pol = THRESHOLDS.get("flexmatch")(3, tau=0.9, mode="indexed", num_samples=6, warmup=True)
    pol.update(one_hot_probs([0, 1, 2], [0.95, 0.95, 0.5]), torch.tensor([0, 1, 2]))
    st = pol.status
    assert st.selected.tolist() == [0, 1, -1, -1, -1, -1]
    assert st.counts.tolist() == [4, 1, 1, 0]
    # warm-up: beta = sigma / max(max sigma, unused) = [1,1,0]/4; tau*b/(2-b)
    b = 0.25
    assert torch.allclose(pol.thresholds(), torch.tensor([0.9 * b / (2 - b), 0.9 * b / (2 - b), 0.0]))
    pol.warmup = False  # beta = sigma / max sigma = [1, 1, 0]
    assert torch.allclose(pol.thresholds(), torch.tensor([0.9, 0.9, 0.0]))
    # a sample re-predicted confidently moves class; an unconfident one keeps its last class
    pol.update(one_hot_probs([2, 2, 0], [0.95, 0.95, 0.3]), torch.tensor([0, 3, 1]))
    assert st.selected.tolist() == [2, 1, -1, 2, -1, -1]
    assert st.counts.tolist() == [3, 0, 1, 2]
    assert st.counts.tolist() == torch.bincount(st.selected + 1, minlength=4).tolist()


def test_dtm_flex_clips_thresholds_into_range():
    pol = THRESHOLDS.get("dtm_flex")(3, tau=0.9, tau_min=0.5, tau_max=0.85, mode="indexed", num_samples=6, warmup=True,
                                prior_correction=False)
    assert torch.allclose(pol.thresholds(), torch.full((3,), 0.5))  # nothing learned yet: the floor
    pol.update(one_hot_probs([0, 1, 2], [0.95, 0.95, 0.5]), torch.tensor([0, 1, 2]))
    assert torch.allclose(pol.thresholds(), torch.tensor([0.5, 0.5, 0.5]))  # 0.1286 clipped up
    pol.warmup = False
    assert torch.allclose(pol.thresholds(), torch.tensor([0.85, 0.85, 0.5]))  # 0.9 clipped down
    mask, pseudo = pol.mask(one_hot_probs([0, 2, 2], [0.8, 0.55, 0.45]))
    assert mask.tolist() == [0.0, 1.0, 0.0] and pseudo.tolist() == [0, 2, 2]


def test_streamed_status_is_an_ema_of_batch_fractions():
    pol = THRESHOLDS.get("dtm_flex")(3, tau=0.9, tau_min=0.0, tau_max=1.0, mode="streamed", momentum=0.5,
                                prior_correction=False)
    pol.update(one_hot_probs([0, 0, 2, 1], [0.95, 0.95, 0.5, 0.95]))
    # fractions [unused, c0, c1, c2] = [1/4, 2/4, 1/4, 0]; status = 0.5*[1,0,0,0] + 0.5*frac
    assert torch.allclose(pol.status.status, torch.tensor([0.625, 0.25, 0.125, 0.0]))
    beta = torch.tensor([0.25, 0.125, 0.0]) / 0.625
    assert torch.allclose(pol.thresholds(), 0.9 * beta / (2 - beta))
    # predicted classes at any confidence: [none, c0, c1, c2] = 0.5*[1,0,0,0] + 0.5*[0, 1/2, 1/4, 1/4]
    assert torch.allclose(pol.status.pred_status, torch.tensor([0.5, 0.25, 0.125, 0.125]))
    # prior-corrected: sigma / pi = [0.25/0.25, 0.125/0.125, 0/0.125] = [1, 1, 0]; max(1, unused 0.625) = 1
    pol.prior_correction = True
    assert torch.allclose(pol.thresholds(), torch.tensor([0.9, 0.9, 0.0]))


def test_prior_correction_makes_status_independent_of_class_frequency():
    kw = dict(tau=0.9, tau_min=0.0, tau_max=1.0, mode="indexed", num_samples=6)
    plain = THRESHOLDS.get("dtm_flex")(3, prior_correction=False, **kw)
    corrected = THRESHOLDS.get("dtm_flex")(3, prior_correction=True, **kw)
    for pol in (plain, corrected):
        pol.update(one_hot_probs([0, 1, 2], [0.95, 0.95, 0.5]), torch.tensor([0, 1, 2]))
        pol.update(one_hot_probs([0, 0], [0.5, 0.5]), torch.tensor([3, 4]))  # more class-0 faces, unconfident
        assert pol.status.last_pred.tolist() == [0, 1, 2, 0, 0, -1]
        assert pol.status.pred_counts.tolist() == [1, 3, 1, 1]
    # plain: sigma = [1, 1, 0]/6, unused 4/6 -> beta = [1/4, 1/4, 0]: both confident classes look alike
    b = 0.25
    assert torch.allclose(plain.thresholds(), torch.tensor([0.9 * b / (2 - b), 0.9 * b / (2 - b), 0.0]))
    # corrected: confident fraction of each predicted class = [1/3, 1, 0]; max(1, 4/6) = 1
    b0 = 1 / 3
    assert torch.allclose(corrected.thresholds(), torch.tensor([0.9 * b0 / (2 - b0), 0.9, 0.0]))


def test_indexed_mode_requires_indices():
    pol = THRESHOLDS.get("flexmatch")(3, tau=0.9, mode="indexed", num_samples=4)
    with pytest.raises(ValueError, match="indices"):
        pol.update(one_hot_probs([0], [0.99]))
    with pytest.raises(ValueError):
        LearningStatus(3, "indexed", None)


def test_freematch_self_adaptive_thresholds():
    pol = THRESHOLDS.get("freematch")(2, momentum=0.5)
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    pol.update(probs)
    assert torch.allclose(pol.time_p, torch.tensor(0.625))
    assert torch.allclose(pol.p_model, torch.tensor([0.625, 0.375]))
    assert torch.allclose(pol.label_hist, torch.tensor([0.75, 0.25]))
    assert torch.allclose(pol.thresholds(), torch.tensor([0.625, 0.375]))
    mask, _ = pol.mask(probs)
    assert mask.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("name", ["flexmatch", "dtm_flex", "freematch", "dtm"])
def test_policy_state_round_trips_through_state_dict(name):
    kw = {"num_samples": 5, "mode": "indexed"} if name in ("flexmatch", "dtm_flex") else {}
    a, b = THRESHOLDS.get(name)(3, **kw), THRESHOLDS.get(name)(3, **kw)
    probs = one_hot_probs([0, 1, 1], [0.99, 0.98, 0.97])
    a.update(probs, torch.tensor([0, 1, 2]))
    assert not torch.allclose(a.thresholds(), b.thresholds())
    b.load_state_dict(a.state_dict())
    assert torch.allclose(a.thresholds(), b.thresholds())


@pytest.mark.parametrize("name", ["dtm_flex", "dtm"])
def test_dtm_stage_schedule(name):
    cfg = SSLConfig(algorithm=name, lambda_u=2.0, warmup_steps=10, ramp_steps=10)
    algo = ALGORITHMS.get(name)(cfg, 3, torch.tensor([1, 1, 1]), num_unlabeled=None)
    assert algo.unlabeled_weight(0) == 0.0 and algo.unlabeled_weight(9) == 0.0
    assert not algo.wants_unlabeled(9) and algo.wants_unlabeled(10)
    assert algo.unlabeled_weight(10) == pytest.approx(0.2)
    assert algo.unlabeled_weight(14) == pytest.approx(1.0)
    assert algo.unlabeled_weight(19) == pytest.approx(2.0) and algo.unlabeled_weight(500) == pytest.approx(2.0)
    if name == "dtm_flex":
        assert algo.policy.status.mode == "streamed"  # no index known -> streamed bookkeeping


def test_dtm_flex_class_quantile_accepts_a_share_of_every_class_down_to_the_floor():
    """class_quantile q: each class's threshold tracks the confidence above which q of its predictions lie."""
    from semifer.registry import THRESHOLDS

    pol = THRESHOLDS.get("dtm_flex")(4, tau=0.95, tau_min=0.8, mode="streamed", class_quantile=0.3,
                                quantile_floor=0.4, quantile_step=0.02)
    g = torch.Generator().manual_seed(0)
    # Class 0 is predicted confidently, classes 1-3 never above ~0.7: a hard DTM would never accept them.
    for _ in range(600):
        logits = torch.randn(512, 4, generator=g)
        logits[:128, 0] += 4.0
        pol.update(torch.softmax(logits, 1))
    thr = pol.thresholds()
    assert thr[0] <= 0.95 and (thr[1:] < 0.8).all() and (thr >= 0.4).all()
    probs = torch.softmax(torch.randn(20000, 4, generator=g), 1)
    conf, pred = probs.max(1)
    for c in range(1, 4):
        share = (conf[pred == c] >= thr[c]).float().mean()
        assert abs(share - 0.3) < 0.08, (c, share)
    # The floor holds even when a class's quantile estimate falls below it.
    pol.quantile.fill_(0.1)
    assert torch.allclose(pol.thresholds(), torch.full((4,), 0.4))


def test_dtm_flex_without_class_quantile_has_no_extra_state():
    from semifer.registry import THRESHOLDS

    assert "quantile" not in THRESHOLDS.get("dtm_flex")(4, mode="streamed").state_dict()


def _sequential_status(selected, last_pred, index, conf, pred, tau):
    """Reference: FlexMatch's bookkeeping one sample at a time, in batch order (later repeats win)."""
    for i, q, c in zip(index.tolist(), conf.tolist(), pred.tolist()):
        if q > tau:
            selected[i] = c
        last_pred[i] = c


def test_indexed_status_with_repeated_indices_matches_sequential_assignment():
    """A set smaller than one global batch is tiled, so one batch repeats indices (StepSampler)."""
    N, B, C, tau = 50, 96, 5, 0.7
    st = LearningStatus(C, "indexed", num_samples=N)
    ref_sel, ref_pred = [-1] * N, [-1] * N
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        index = torch.randint(0, N, (B,), generator=g)  # ~ half the batch are repeats
        probs = torch.softmax(3 * torch.randn(B, C, generator=g), dim=1)
        conf, pred = probs.max(dim=1)
        st.update(conf, pred, tau, index)
        _sequential_status(ref_sel, ref_pred, index, conf, pred, tau)
        assert st.selected.tolist() == ref_sel and st.last_pred.tolist() == ref_pred
        for values, hist in ((st.selected, st.counts), (st.last_pred, st.pred_counts)):
            assert (hist >= 0).all(), hist.tolist()
            assert hist.tolist() == torch.bincount(values + 1, minlength=C + 1).tolist()
            assert int(hist.sum()) == N


def test_flexmatch_status_with_a_tiled_step_sampler_batch():
    from semifer.data.imageset import StepSampler

    N, B, C, tau = 50, 96, 5, 0.7
    sampler = StepSampler(N, B, seed=1)
    assert sampler.tiles == 2
    pol = THRESHOLDS.get("flexmatch")(C, tau=tau, mode="indexed", num_samples=N)
    ref_sel, ref_pred = [-1] * N, [-1] * N
    g = torch.Generator().manual_seed(1)
    for step in range(40):
        index = sampler.indices(step)
        assert len(set(index.tolist())) < B  # the batch repeats samples
        probs = torch.softmax(3 * torch.randn(B, C, generator=g), dim=1)
        pol.update(probs, index)
        conf, pred = probs.max(dim=1)
        _sequential_status(ref_sel, ref_pred, index, conf, pred, tau)
        st = pol.status
        assert st.selected.tolist() == ref_sel
        assert st.counts.tolist() == torch.bincount(st.selected + 1, minlength=C + 1).tolist()
        assert (st.counts >= 0).all() and (pol.thresholds() >= 0).all()


class _Logits(torch.nn.Module):
    """A 'network' whose input already is its logits."""

    def forward(self, x):
        return x


def _flexmatch_step(algo, probs, index):
    C = probs.shape[1]
    batch = {"x_l": torch.zeros(1, C), "y_l": torch.zeros(1, dtype=torch.long),
             "x_uw": probs.log(), "x_us": probs.log(), "idx_u": index}
    _, logs = algo.step(_Logits(), _Logits(), batch, step=0)
    return logs


def test_flexmatch_masks_with_the_previous_status_then_updates():
    """USB's FlexMatch hook computes the mask from the previous step's status, then updates it."""
    cfg = SSLConfig(algorithm="flexmatch", tau=0.9, status_mode="indexed", threshold_warmup=True)
    algo = ALGORITHMS.get("flexmatch")(cfg, 3, torch.tensor([1, 1, 1]), num_unlabeled=2)
    probs = one_hot_probs([0, 0], [0.95, 0.5])
    # Step 1: status still all-unused -> thresholds 0 -> both accepted. (Updating first would make
    # sigma(0) = 1/2 = unused, beta(0) = 1, threshold 0.9, and reject the 0.5 sample.)
    logs = _flexmatch_step(algo, probs, torch.tensor([0, 1]))
    assert logs["mask_rate"].item() == 1.0
    assert algo.policy.status.selected.tolist() == [0, -1]  # ... and the batch was absorbed after masking
    # Step 2: the same batch now meets threshold 0.9 for class 0.
    logs = _flexmatch_step(algo, probs, torch.tensor([0, 1]))
    assert logs["mask_rate"].item() == 0.5


def test_policy_order_flags():
    from semifer.ssl.thresholds import DynamicThreshold

    assert THRESHOLDS.get("fixed").update_before_mask
    assert THRESHOLDS.get("freematch").update_before_mask
    assert not THRESHOLDS.get("flexmatch").update_before_mask
    assert not DynamicThreshold.update_before_mask  # the FlexMatch-status DTM policy (dtm_flex)
    assert THRESHOLDS.get("dtm_flex") is DynamicThreshold
    assert THRESHOLDS.get("dtm").update_before_mask  # the precision-target DTM: histogram, then mask
