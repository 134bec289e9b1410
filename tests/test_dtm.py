"""DTM: precision-target thresholds on calibrated probabilities (ssl/dtm.py), online (ssl/dtm_online.py)
and in rounds (ssl/rounds.py): hand-computed thresholds, calibration, state, and exact resume."""
import json
import math
import tarfile

import pytest
import torch
from PIL import Image

import semifer
from semifer.engine.checkpoint import load_checkpoint
from semifer.engine.runlog import read_metrics
from semifer.registry import ALGORITHMS, THRESHOLDS
from semifer.ssl.dtm import PrecisionThreshold, fit_calibration, tail_thresholds
from tests.conftest import stripes, tiny_config


def probs_with(pred, conf, C):
    """Probabilities whose argmax is ``pred`` with max value ``conf``, the rest spread evenly."""
    pred, conf = torch.as_tensor(pred), torch.as_tensor(conf, dtype=torch.float32)
    p = ((1 - conf) / (C - 1))[:, None].repeat(1, C)
    p[torch.arange(len(pred)), pred] = conf
    return p


# --------------------------------------------------------------------------- tail_thresholds
def test_tail_thresholds_by_hand():
    # 4 bins with lower edges 0, .25, .5, .75; target precision .8, floor .5.
    count = torch.tensor([[0., 0., 2., 2.],    # c0: two faces at .6, two at .9
                          [1., 1., 1., 3.],    # c1: .2, .3, .6 and three at .95
                          [0., 1., 0., 9.],    # c2: one at .4, nine at .98
                          [2., 2., 0., 0.],    # c3: two at .2, two at .35
                          [0., 0., 0., 0.]])   # c4: never predicted
    conf_sum = torch.tensor([[0., 0., 1.2, 1.8],
                             [.2, .3, .6, 2.85],
                             [0., .4, 0., 8.82],
                             [.4, .7, 0., 0.],
                             [0., 0., 0., 0.]])
    # Tail means (sum of q / count over bins >= edge), edges 0 / .25 / .5 / .75:
    # c0: -, -, 3.0/4 = .75, 1.8/2 = .9            -> lowest edge reaching .8: .75, precision .9, 2 faces
    # c1: 3.95/6 = .658, 3.75/5 = .75, 3.45/4 = .8625, .95  -> .5, precision .8625, 4 faces
    # c2: 9.22/10 = .922 at edges 0 and .25 (below the floor), 8.82/9 = .98 at .5 -> floor .5, .98, 9 faces
    # c3: .275, .35, -, -                          -> never .8: closed (1), precision 0, 0 faces
    # c4: nothing                                  -> closed
    # Shares: accepted faces / all 24 faces.
    thr, est, share = tail_thresholds(count, conf_sum, target=0.8, floor=0.5)
    assert torch.allclose(thr, torch.tensor([.75, .5, .5, 1., 1.]))
    assert torch.allclose(est, torch.tensor([.9, .8625, .98, 0., 0.]))
    assert torch.allclose(share, torch.tensor([2., 4., 9., 0., 0.]) / 24)
    # Without the floor c2 opens at edge 0 (all 10 faces, precision .922); the others are unchanged.
    thr0, est0, share0 = tail_thresholds(count, conf_sum, target=0.8, floor=0.0)
    assert torch.allclose(thr0, torch.tensor([.75, .5, 0., 1., 1.]))
    assert est0[2] == pytest.approx(9.22 / 10) and share0[2] == pytest.approx(10 / 24)
    # Target .91: c0's best tail (.9) falls short -> closed; c1 needs its top bin (.95 at edge .75);
    # c2 keeps the floor (.98).
    thr9, est9, _ = tail_thresholds(count, conf_sum, target=0.91, floor=0.5)
    assert torch.allclose(thr9, torch.tensor([1., .75, .5, 1., 1.]))
    assert torch.allclose(est9, torch.tensor([0., .95, .98, 0., 0.]))


def test_tail_thresholds_held_out_evidence_by_hand():
    # c0 of the hand test above: calibrated tails .75 (edge .5) and .9 (edge .75), target .8.
    count = torch.tensor([[0., 0., 2., 2.]])
    conf_sum = torch.tensor([[0., 0., 1.2, 1.8]])
    # Held-out faces predicted c0: 2 in bin .75 (both right), 4 in bin .5 (1 right).
    held_n = torch.tensor([[0., 0., 4., 2.]])
    held_r = torch.tensor([[0., 0., 1., 2.]])
    # evidence a = 4: edge .75 -> (4 * .9 + 2) / (4 + 2) = .9333; edge .5 -> (4 * .75 + 3) / (4 + 6) = .6
    thr, est, share = tail_thresholds(count, conf_sum, 0.8, 0.5, held_n, held_r, evidence=4.0)
    assert thr.item() == pytest.approx(0.75) and est.item() == pytest.approx(5.6 / 6)
    # Held-out faces that are right more often than calibrated open the class lower:
    # edge .5 with 6 right of 6 -> (4 * .75 + 6) / 10 = .9
    thr2, est2, _ = tail_thresholds(count, conf_sum, 0.8, 0.5, held_n, torch.tensor([[0., 0., 4., 2.]]), evidence=4.0)
    assert thr2.item() == pytest.approx(0.5) and est2.item() == pytest.approx(0.9)
    # A weak prior lets 1 right of 6 close a class the calibration alone would open at .75.
    thr3, _, _ = tail_thresholds(count, conf_sum, 0.8, 0.5, held_n, torch.tensor([[0., 0., 1., 0.]]), evidence=1.0)
    assert thr3.item() == 1.0
    # evidence 0 = the calibration alone, whatever the held-out faces say.
    thr0, est0, _ = tail_thresholds(count, conf_sum, 0.8, 0.5, held_n, held_r, evidence=0.0)
    assert thr0.item() == pytest.approx(0.75) and est0.item() == pytest.approx(0.9)


def test_held_out_evidence_down_only_vetoes_never_opens():
    # The hand test's class 0 (calibrated tails .75 at edge .5, .9 at edge .75; target .8).
    count = torch.tensor([[0., 0., 2., 2.]])
    conf_sum = torch.tensor([[0., 0., 1.2, 1.8]])
    held_n = torch.tensor([[0., 0., 4., 2.]])
    # Held-out faces all right: "both" opens at .5 (posterior .9); "down" keeps the calibration's .75.
    all_right = torch.tensor([[0., 0., 4., 2.]])
    thr_b, _, _ = tail_thresholds(count, conf_sum, 0.8, 0.5, held_n, all_right, evidence=4.0, side="both")
    thr_d, est_d, _ = tail_thresholds(count, conf_sum, 0.8, 0.5, held_n, all_right, evidence=4.0, side="down")
    assert thr_b.item() == pytest.approx(0.5)
    assert thr_d.item() == pytest.approx(0.75) and est_d.item() == pytest.approx(0.9)
    # Held-out faces all wrong: edge .75 -> min(.9, 4 * .9 / 6) = .6, edge .5 -> min(.75, 3 / 10): closed.
    thr_w, est_w, _ = tail_thresholds(count, conf_sum, 0.8, 0.5, held_n, torch.zeros(1, 4), evidence=4.0, side="down")
    assert thr_w.item() == 1.0 and est_w.item() == 0.0
    with pytest.raises(ValueError, match="evidence_side"):
        PrecisionThreshold(3, holdout_evidence=4.0, evidence_side="up")


def test_evidence_quota_scales_the_quota_of_classes_the_held_out_slice_barely_holds():
    from semifer.ssl.rounds import evidence_scale
    labels = torch.tensor([0] * 12 + [1] * 2 + [3] * 5)
    assert evidence_scale(labels, 4, 10).tolist() == pytest.approx([1.0, 0.2, 0.0, 0.5])
    with pytest.raises(ValueError, match="evidence_quota"):
        ALGORITHMS.get("dtm_rounds")(semifer.config.SSLConfig(evidence_quota=10), 4, torch.ones(4), 10)


def test_held_out_evidence_uses_the_calibrated_held_out_faces():
    """The policy histograms its calibrated held-out faces (predicted class, confidence, right or
    wrong) and its thresholds are tail_thresholds' Beta posterior over them."""
    C, bins = 3, 50
    torch.manual_seed(0)
    conf = torch.linspace(0.5, 0.999, 400)
    pol_plain = PrecisionThreshold(C, target=0.8, floor=0.5, bins=bins, prior_shift=False)
    pol_held = PrecisionThreshold(C, target=0.8, floor=0.5, bins=bins, prior_shift=False, holdout_evidence=10.0)
    # Held-out: 90 faces; of the 60 the teacher calls class 0 only the 8 most confident are right.
    logits = torch.randn(90, C)
    logits[:60, 0] += torch.linspace(2.0, 7.0, 60)
    labels = torch.where(torch.arange(90) < 60, 1, 2)
    labels[52:60] = 0
    for pol in (pol_plain, pol_held):
        pol.calibrate(logits, labels)
        pol.set_histogram(probs_with([0] * len(conf), conf, C))
    assert "held_count" in dict(pol_held.named_buffers()) and "held_count" not in dict(pol_plain.named_buffers())
    q = pol_held.calibrated(logits.softmax(1))
    hconf, hpred = q.max(1)
    b = (hconf * bins).long().clamp(0, bins - 1)
    n = torch.zeros(C, bins)
    r = torch.zeros(C, bins)
    for i in range(90):
        n[hpred[i], b[i]] += 1
        r[hpred[i], b[i]] += float(hpred[i] == labels[i])
    assert torch.equal(pol_held.held_count, n) and torch.equal(pol_held.held_right, r)
    thr, est, _ = tail_thresholds(pol_held.count, pol_held.conf_sum, 0.8, 0.5, n, r, evidence=10.0)
    assert torch.equal(pol_held.thresholds(), thr) and torch.allclose(pol_held.est_precision, est)
    # The held-out faces moved class 0's threshold (which way is the hand test's business).
    assert pol_held.thresholds()[0] != pol_plain.thresholds()[0]
    # The state round-trips through a state_dict into a fresh policy with the option.
    fresh = PrecisionThreshold(C, target=0.8, floor=0.5, bins=bins, prior_shift=False, holdout_evidence=10.0)
    fresh.load_state_dict(pol_held.state_dict())
    fresh.refresh()
    assert torch.equal(fresh.thresholds(), pol_held.thresholds())
    # A checkpoint made without the option loads into a policy with it, thresholds unchanged
    # until the next calibration (empty held-out histograms).
    later = PrecisionThreshold(C, target=0.8, floor=0.5, bins=bins, prior_shift=False, holdout_evidence=10.0)
    later.load_state_dict(pol_plain.state_dict())
    later.refresh()
    assert later.held_count.sum() == 0 and torch.equal(later.thresholds(), pol_plain.thresholds())


def test_every_class_with_a_confident_tail_opens_however_rare():
    """The thresholds are per class: a rare class with a trustworthy tail is not drowned by a frequent one."""
    C = 8
    sizes = [4000, 40, 25, 300, 900, 120, 60, 15]   # skewed like face data (happy dominates)
    preds, confs = [], []
    for c, n in enumerate(sizes):
        k = max(1, int(0.3 * n))                     # 30 % of each class confidently right
        preds += [c] * n
        confs += [0.97] * k + torch.linspace(0.3, 0.45, n - k).tolist()
    pol = PrecisionThreshold(C, target=0.8, floor=0.5, bins=100)
    pol.set_histogram(probs_with(preds, confs, C))
    # Every class: tail at the floor = its confident faces only, precision .97 -> threshold .5.
    assert torch.allclose(pol.thresholds(), torch.full((C,), 0.5)), pol.thresholds()
    assert torch.allclose(pol.est_precision, torch.full((C,), 0.97), atol=1e-4)
    # The rarest class accepts its confident faces: 4 of its 15, out of 5460 in all.
    assert pol.accept_share[7] == pytest.approx(4 / sum(sizes), rel=1e-4)
    # A class without a confident tail stays closed.
    confs_low = [min(q, 0.6) if p == 3 else q for p, q in zip(preds, confs)]
    pol.set_histogram(probs_with(preds, confs_low, C))
    assert pol.thresholds()[3] == 1.0 and (pol.thresholds()[[0, 1, 2, 4, 5, 6, 7]] < 1).all()


# --------------------------------------------------------------------------- calibration
def test_fit_calibration_recovers_temperature_and_bias():
    g = torch.Generator().manual_seed(0)
    N, C, T = 20000, 4, 2.0
    z = 3 * torch.randn(N, C, generator=g)
    b = torch.tensor([0.6, -0.4, 0.0, -0.2])          # mean 0: softmax ignores a common shift
    y = torch.multinomial((z / T + b).softmax(1), 1, generator=g).squeeze(1)
    t_hat, b_hat = fit_calibration(z, y, C, prior=0.0)
    assert t_hat.shape == (1,) and b_hat.shape == (C,)
    assert t_hat.item() == pytest.approx(T, abs=0.1)
    assert torch.allclose(b_hat - b_hat.mean(), b, atol=0.06), b_hat
    # The default prior barely matters with 20,000 faces ...
    t_d, b_d = fit_calibration(z, y, C)
    assert t_d.item() == pytest.approx(T, abs=0.1) and torch.allclose(b_d, b, atol=0.12)
    assert b_d.norm() < b_hat.norm()
    # ... but holds 16 faces near the identity, where the free fit chases noise.
    few = torch.arange(16)
    t_f, b_f = fit_calibration(z[few], y[few], C, prior=0.0)
    t_p, b_p = fit_calibration(z[few], y[few], C)
    assert b_p.norm() < 0.5 * b_f.norm() and abs(t_p.log().item()) < abs(t_f.log().item())
    # bias_prior shrinks the biases alone: 150 faces, a bias prior worth 10,000 faces -> b near 0,
    # T still fitted (the temperature keeps its own, default prior).
    some = torch.arange(150)
    t_s, b_s = fit_calibration(z[some], y[some], C)
    t_b, b_b = fit_calibration(z[some], y[some], C, bias_prior=10000.0)
    assert b_b.norm() < 0.05 * b_s.norm() and b_b.norm() < 0.02
    assert t_b.item() == pytest.approx(T, abs=0.6)
    pol = PrecisionThreshold(C, bias_prior=10000.0, prior_shift=False)
    pol.calibrate(z[some], y[some])
    assert torch.allclose(pol.bias, b_b) and torch.allclose(pol.temperature, t_b)
    with pytest.raises(ValueError, match="bias_prior"):
        PrecisionThreshold(C, bias_prior=-1.0)
    # Nothing held out: the identity calibration.
    t0, b0 = fit_calibration(torch.empty(0, C), torch.empty(0, dtype=torch.long), C)
    assert t0.item() == 1.0 and torch.equal(b0, torch.zeros(C))


def test_calibrate_sets_the_buffers_and_the_holdout_precision():
    g = torch.Generator().manual_seed(1)
    C = 3
    z = 4 * torch.randn(3000, C, generator=g)
    y = torch.multinomial((z / 2).softmax(1), 1, generator=g).squeeze(1)
    pol = PrecisionThreshold(C, target=0.8, floor=0.5, bins=20)
    assert (pol.holdout_precision == -1).all()        # "not measured", not NaN (resume compares buffers)
    pol.calibrate(z, y)
    assert pol.temperature.item() == pytest.approx(2.0, abs=0.2) and int(pol.calibrations) == 1
    assert (pol.holdout_precision == -1).all()        # every class still closed: nothing accepted
    pol.set_histogram(pol.calibrated(z.softmax(1)))
    assert (pol.thresholds() < 1).all()
    # Held-out precision at the new thresholds: the accepted held-out faces' accuracy, per class.
    q = pol.calibrated(z.softmax(1))
    conf, pred = q.max(1)
    for c in range(C):
        sel = (pred == c) & (conf >= pol.thresholds()[c])
        assert pol.holdout_precision[c].item() == pytest.approx((y[sel] == c).float().mean().item(), abs=1e-6)
        assert pol.holdout_precision[c] > 0.75        # calibrated: about the 0.8 target


# --------------------------------------------------------------------------- the policy online
def test_online_update_opens_a_class_as_its_confidence_rises():
    C = 3
    pol = PrecisionThreshold(C, target=0.8, floor=0.5, bins=20, momentum=0.9)
    assert torch.equal(pol.thresholds(), torch.ones(C))            # closed until a histogram exists
    history = []
    for t in range(60):
        rising = 0.4 + 0.55 * t / 59                                # class 1: 0.4 -> 0.95
        pred = [0] * 100 + [1] * 100 + [2] * 100
        conf = [0.95] * 100 + [rising] * 100 + [0.6] * 100           # class 2 stays at 0.6: never .8
        pol.update(probs_with(pred, conf, C))
        history.append(pol.thresholds().clone())
    h = torch.stack(history)
    assert h[0, 1] == 1.0 and h[-1, 1] < 0.9                        # class 1 starts closed, ends open
    assert (h[1:, 1] <= h[:-1, 1] + 1e-6).all()                     # and its threshold only falls
    assert torch.allclose(h[:, 0], torch.full((60,), 0.5))         # class 0: always at the floor
    assert (h[:, 2] == 1.0).all()                                   # class 2: always closed
    # The state is in buffers: a fresh policy loading it has the same thresholds and mask.
    keys = {"temperature", "bias", "count", "conf_sum", "thr", "est_precision", "accept_share",
            "holdout_precision", "calibrations"}
    assert keys <= set(pol.state_dict())
    other = PrecisionThreshold(C, target=0.8, floor=0.5, bins=20, momentum=0.9)
    other.load_state_dict(pol.state_dict())
    probs = torch.softmax(3 * torch.randn(500, C, generator=torch.Generator().manual_seed(2)), 1)
    assert torch.equal(other.thresholds(), pol.thresholds())
    for a, b in zip(other.mask(probs), pol.mask(probs)):
        assert torch.equal(a, b)
    # ... and continues identically.
    other.update(probs)
    pol.update(probs)
    assert torch.equal(other.count, pol.count) and torch.equal(other.thresholds(), pol.thresholds())


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_policy_moves_devices(device):
    pol = PrecisionThreshold(4, bins=10).to(device)
    assert all(b.device.type == device for b in pol.buffers())
    probs = torch.softmax(3 * torch.randn(64, 4), 1).to(device)
    pol.update(probs)
    mask, pseudo = pol.mask(probs)
    assert mask.device.type == device and pseudo.device.type == device and pol.thresholds().device.type == device
    assert pol.to("cpu").thresholds().device.type == "cpu"


def test_mask_is_the_threshold_rule_on_calibrated_probabilities():
    C = 4
    g = torch.Generator().manual_seed(3)
    pol = PrecisionThreshold(C, target=0.8, floor=0.5, bins=10)
    pol.temperature.fill_(0.5)
    pol.bias.copy_(torch.tensor([0.8, -0.5, 0.0, 0.3]))
    pol.thr.copy_(torch.tensor([0.6, 0.7, 1.0, 0.9]))               # class 2 closed
    probs = torch.softmax(2 * torch.randn(4000, C, generator=g), 1)
    mask, pseudo = pol.mask(probs)
    # The rule, written out: q = softmax(log p / T + b); keep argmax q where q_max >= its class's
    # threshold and the class is open.
    q = torch.softmax(probs.log() / 0.5 + torch.tensor([0.8, -0.5, 0.0, 0.3]), 1)
    conf, pred = q.max(1)
    thr = pol.thr[pred]
    expected = (conf >= thr) & (thr < 1)
    assert torch.equal(pseudo, pred) and torch.equal(mask.bool(), expected)
    assert mask.dtype == probs.dtype and 0 < expected.sum() < len(expected)
    assert not (mask.bool() & (pred == 2)).any()                    # a closed class accepts nothing
    # The calibration matters: the same thresholds on the raw probabilities decide differently.
    raw_conf, raw_pred = probs.max(1)
    assert not torch.equal(expected, raw_conf >= pol.thr[raw_pred]) or not torch.equal(pred, raw_pred)
    # Even a calibrated confidence of exactly 1 is refused by a closed class.
    sure = torch.zeros(1, C)
    sure[0, 2] = 1.0
    pol.temperature.fill_(1.0)
    pol.bias.zero_()
    assert pol.mask(sure)[0].item() == 0.0


# --------------------------------------------------------------------------- training runs
ROUNDS = {"warmup_steps": 10, "rounds": 2, "holdout_fraction": 0.25, "mu": 2, "target_precision": 0.4, "precision_floor": 0.2}


def _rounds_cfg(tiny_data, out):
    # Stage 0 = steps 0-9; round 0 = steps 10-12, round 1 = steps 13-15 ((16 - 10) // 2 = 3 steps each).
    return tiny_config(tiny_data, out, algorithm="dtm_rounds", steps=16, ssl=ROUNDS,
                       run={"checkpoint_every": 4, "eval_every": 4})


@pytest.fixture(scope="module")
def rounds_run(tiny_data, tmp_path_factory):
    return semifer.train(_rounds_cfg(tiny_data, tmp_path_factory.mktemp("rounds") / "full"))


def _assert_same_state(a_path, b_path):
    a, b = load_checkpoint(a_path), load_checkpoint(b_path)
    assert a["step"] == b["step"]
    for part in ("model", "ema", "algorithm"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    return a


def test_dtm_rounds_logs_one_record_per_round(rounds_run):
    assert rounds_run.completed and math.isfinite(rounds_run.macro_f1) and 0 <= rounds_run.macro_f1 <= 1
    recs = [r for r in read_metrics(rounds_run.run_dir) if r["kind"] == "round"]
    assert [(r["round"], r["step"]) for r in recs] == [(0, 10), (1, 13)]
    for r in recs:
        assert len(r["thresholds"]) == len(r["accepted_per_class"]) == len(r["est_precision"]) == 8
        assert sum(r["accepted_per_class"]) == r["accepted"] <= r["unlabeled"] == 240
        for thr, n, est in zip(r["thresholds"], r["accepted_per_class"], r["est_precision"]):
            if thr < 1:
                assert est >= ROUNDS["target_precision"] - 1e-6 and thr >= ROUNDS["precision_floor"]  # target and floor
            else:
                assert n == 0 and est == 0
    assert recs[-1]["accepted"] > 0          # the round-1 teacher trusts some faces ...
    train = [r for r in read_metrics(rounds_run.run_dir) if r["kind"] == "train"]
    assert all("loss_u" not in r for r in train if r["step"] <= 10)      # ... stage 0 is supervised
    assert any(r.get("loss_u") is not None for r in train if r["step"] > 13)  # ... and round 1 learns from them
    ck = load_checkpoint(rounds_run.run_dir / "checkpoints" / "last.pt")
    alg = ck["algorithm"]
    assert int(alg["round"]) == 1 and int(alg["accepted"].sum()) == recs[-1]["accepted"]
    assert alg["targets"].shape == (240, 8) and torch.equal(alg["policy.thr"], torch.tensor(recs[-1]["thresholds"]))
    # `semifer pseudolabel --threshold dtm` rebuilds the rounds state (its per-face buffers need the set's size).
    from semifer.infer.pseudolabel import threshold_policy
    pol, thr, where = threshold_policy("dtm", ck, rounds_run.run_dir / "checkpoints" / "last.pt")
    assert "dtm_rounds state" in where and torch.equal(torch.from_numpy(thr).float(), alg["policy.thr"])
    assert torch.equal(pol.temperature, alg["policy.temperature"])


def test_dtm_rounds_resumes_mid_round_exactly(rounds_run, tiny_data, tmp_path):
    cfg = _rounds_cfg(tiny_data, tmp_path / "part")
    first = semifer.train(cfg, stop_after=15)                 # steps 0-14: stopped 2 steps into round 1
    assert first.steps == 15 and not first.completed
    mid = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")["algorithm"]
    assert int(mid["round"]) == 1 and mid["accepted"].any()   # mid-round, with pseudo-labels in use
    second = semifer.train(cfg)
    assert second.completed and second.macro_f1 == rounds_run.macro_f1
    a = _assert_same_state(rounds_run.run_dir / "checkpoints" / "last.pt", tmp_path / "part" / "checkpoints" / "last.pt")
    for k in ("round", "targets", "accepted", "pseudo"):
        assert k in a["algorithm"]
    # The resumed run did not label round 1 a second time.
    assert [r["round"] for r in read_metrics(tmp_path / "part") if r["kind"] == "round"] == [0, 1]


def test_holdout_rejoins_for_the_last_round_and_resumes_exactly(rounds_run, tiny_data, tmp_path):
    def cfg(out):
        return tiny_config(tiny_data, out, algorithm="dtm_rounds", steps=16, ssl={**ROUNDS, "holdout_rejoin": True},
                           run={"checkpoint_every": 4, "eval_every": 4})
    full = semifer.train(cfg(tmp_path / "full"))
    joined = [r for r in read_metrics(full.run_dir) if r.get("holdout_joined")]
    split = json.loads((full.run_dir / "holdout.json").read_text())
    held = len(split["labeled"])
    assert held > 0 and [(r["step"], r["holdout_joined"]) for r in joined] == [(13, held)]   # once, at round 1
    assert joined[0]["labeled_now"] == held + len(split["rest"])                              # grown by the slice
    # Same as the run without the option up to the last round, different after it (it trained on more labels).
    a, b = load_checkpoint(full.run_dir / "checkpoints" / "last.pt"), load_checkpoint(rounds_run.run_dir / "checkpoints" / "last.pt")
    assert any(not torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    semifer.train(cfg(tmp_path / "part"), stop_after=15)      # stopped 2 steps into the last round
    semifer.train(cfg(tmp_path / "part"))
    _assert_same_state(full.run_dir / "checkpoints" / "last.pt", tmp_path / "part" / "checkpoints" / "last.pt")
    assert [r["step"] for r in read_metrics(tmp_path / "part") if r.get("holdout_joined")] == [13, 15]   # re-joined on resume


ONLINE = {"warmup_steps": 4, "calib_every": 3, "holdout_fraction": 0.25, "mu": 2, "hist_momentum": 0.5}


def _online_cfg(tiny_data, out):
    return tiny_config(tiny_data, out, algorithm="dtm", steps=12, ssl=ONLINE,
                       run={"checkpoint_every": 4, "eval_every": 4})


def test_online_dtm_calibrates_on_schedule_and_resumes_exactly(tiny_data, tmp_path):
    full = semifer.train(_online_cfg(tiny_data, tmp_path / "full"))
    assert full.completed and math.isfinite(full.macro_f1)
    cal = [r for r in read_metrics(tmp_path / "full") if r["kind"] == "calibration"]
    assert [r["step"] for r in cal] == [4, 7, 10]             # at the warm-up's end, then every 3 steps
    for r in cal:
        assert r["temperature"] > 0 and len(r["bias"]) == len(r["thresholds"]) == 8
    held = (tmp_path / "full" / "holdout.json")
    assert held.exists()
    cfg = _online_cfg(tiny_data, tmp_path / "part")
    semifer.train(cfg, stop_after=8)                          # between the calibrations at 7 and 10
    assert int(load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")["algorithm"]["policy.calibrations"]) == 2
    second = semifer.train(cfg)
    assert second.completed and second.macro_f1 == full.macro_f1
    a = _assert_same_state(tmp_path / "full" / "checkpoints" / "last.pt", tmp_path / "part" / "checkpoints" / "last.pt")
    assert int(a["algorithm"]["policy.calibrations"]) == 3
    assert [r["step"] for r in read_metrics(tmp_path / "part") if r["kind"] == "calibration"] == [4, 7, 10]


# --------------------------------------------------------------------------- streamed sources
@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtm_streamed")
    images, _ = stripes(2, seed=7)
    folder = root / "faces"
    folder.mkdir()
    for i, a in enumerate(images):
        Image.fromarray(a).save(folder / f"{i:04d}.png")
    with tarfile.open(root / "shard-000000.tar", "w") as tar:
        for p in sorted(folder.iterdir()):
            tar.add(p, arcname=p.name)
    return {"wds": f"wds:{root / 'shard-000000.tar'}", "folder": f"stream:folder:{folder}"}


def _streamed_rounds(tiny_data, streamed, kind, out):
    return tiny_config(tiny_data, out, algorithm="dtm_rounds", steps=4,
                       data={"unlabeled": [streamed[kind]], "num_workers": 0},
                       ssl={"warmup_steps": 2, "rounds": 1}, run={"checkpoint_every": 1})


def test_dtm_rounds_refuses_a_streamed_source_clearly(tiny_data, streamed, tmp_path):
    with pytest.raises(ValueError, match="in-memory unlabeled set.*streamed sources"):
        semifer.train(_streamed_rounds(tiny_data, streamed, "wds", tmp_path / "r"))
    assert not (tmp_path / "r" / "checkpoints" / "last.pt").exists()


@pytest.mark.parametrize("case", ["indexed streamed source", "no holdout"])
def test_dtm_rounds_refuses_what_it_cannot_label_before_training(tiny_data, streamed, tmp_path, case):
    if case == "no holdout":
        cfg = tiny_config(tiny_data, tmp_path / "r", algorithm="dtm_rounds", steps=4,
                          ssl={"warmup_steps": 2, "rounds": 1, "holdout_fraction": 0.0}, run={"checkpoint_every": 1})
        match = "holdout"
    else:
        cfg, match = _streamed_rounds(tiny_data, streamed, "folder", tmp_path / "r"), "in-memory"
    with pytest.raises(ValueError, match=match):
        semifer.train(cfg)
    assert not (tmp_path / "r" / "checkpoints" / "last.pt").exists()


def test_thresholds_registry_names():
    assert THRESHOLDS.get("dtm") is PrecisionThreshold
    assert ALGORITHMS.get("dtm").uses_holdout and ALGORITHMS.get("dtm_rounds").uses_holdout
    assert not ALGORITHMS.get("dtm_flex").uses_holdout


def test_dtm_rounds_consistency_draws_accepted_and_uniform_faces_and_learns_from_both(tiny_data, tmp_path):
    from semifer.config import SSLConfig
    alg = ALGORITHMS.get("dtm_rounds")(SSLConfig(rounds=1, round_consistency=1.0), 8, torch.ones(8), num_unlabeled=50)
    assert alg.unlabeled_views == ("weak", "strong")      # the teacher needs the weak view of the uniform half
    alg.round.fill_(0)
    alg.accepted[:5] = True
    alg.pseudo[:5] = torch.arange(5)
    idx = alg.unlabeled_indices(0, torch.Generator().manual_seed(0), 64)
    assert idx.shape == (64,) and bool((idx[0::2] < 5).all())   # even slots: accepted faces only
    assert int((idx[1::2] >= 5).sum()) > 20                     # odd slots: drawn from all 50
    cfg = tiny_config(tiny_data, tmp_path / "c", algorithm="dtm_rounds", steps=16,
                      ssl={**ROUNDS, "round_consistency": 1.0, "tau": 0.0}, run={"checkpoint_every": 4, "eval_every": 4})
    res = semifer.train(cfg)
    train = [r for r in read_metrics(res.run_dir) if r["kind"] == "train" and r.get("loss_u") is not None]
    assert train and all(r["consistency_mask_rate"] == 1.0 and r["loss_c"] > 0 for r in train)   # tau 0: every face counts


def test_stream_prior_correction_is_log_of_the_draw_mix_over_the_labeled_prior():
    from semifer.config import SSLConfig
    C = 4
    counts = torch.tensor([40.0, 30.0, 20.0, 10.0])          # labeled prior 0.4 0.3 0.2 0.1
    alg = ALGORITHMS.get("dtm_rounds")(SSLConfig(rounds=1, stream_prior_correction=True, pseudo_sampling="uniform"),
                                       C, counts, num_unlabeled=10)
    alg.accepted[:8] = True
    alg.pseudo[:8] = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])   # draws: 0.75 class 0, 0.25 class 1, none of 2 or 3
    alg.pseudo[8:] = 3                                         # not accepted: never drawn, never counted
    r = alg.stream_correction()
    assert r[0].item() == pytest.approx(math.log(0.75 / 0.4), abs=1e-3)
    assert r[1].item() == pytest.approx(math.log(0.25 / 0.3), abs=1e-3)
    assert r[2].item() < math.log(1e-3 / 0.2) and r[3].item() < math.log(1e-3 / 0.1)   # closed: pushed far down
    # The point of it: a class the round never accepts gets (almost) no gradient from the pseudo-label
    # term, while the uncorrected term pushes its logit down with every other class's face.
    alg.stream_log_ratio.copy_(r)
    alg.round.fill_(0)
    logits = torch.zeros(8, C, requires_grad=True)
    target = torch.nn.functional.one_hot(alg.pseudo[:8], C).float()
    for correct, check in ((True, lambda g: g.abs().max() < 1e-3), (False, lambda g: (g > 0.1).all())):
        logits.grad = None
        adj = logits + alg.stream_log_ratio if correct else logits
        (-(target * adj.log_softmax(1)).sum(1).mean()).backward()
        assert check(logits.grad[:, 3] * 8), (correct, logits.grad[:, 3])


def test_stream_prior_correction_runs_and_resumes_with_its_buffer(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "s", algorithm="dtm_rounds", steps=16,
                      ssl={**ROUNDS, "stream_prior_correction": True}, run={"checkpoint_every": 4, "eval_every": 8})
    res = semifer.train(cfg)
    alg = load_checkpoint(res.run_dir / "checkpoints" / "last.pt")["algorithm"]
    ratio = alg["stream_log_ratio"]
    assert ratio.shape == (8,) and torch.isfinite(ratio).all() and ratio.abs().sum() > 0


def test_quota_raises_only_the_classes_over_their_share_to_their_kth_best_face():
    from semifer.ssl.rounds import quota_thresholds
    conf = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.55, 0.95, 0.6])
    pred = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    thr = torch.tensor([0.5, 0.5, 1.0])
    out = quota_thresholds(conf, pred, thr, torch.tensor([3, 5, 4]))
    assert out.tolist() == pytest.approx([0.7, 0.5, 1.0])   # class 0: 5 above 0.5, quota 3 -> its 3rd best; 1 under quota; 2 closed
    assert quota_thresholds(conf, pred, thr, torch.tensor([0, 5, 4])).tolist() == pytest.approx([1.0, 0.5, 1.0])  # quota 0 closes
    assert int(((conf >= out[pred]) & (pred == 0)).sum()) == 3


def test_max_class_share_caps_the_easy_class_in_a_round(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "q", algorithm="dtm_rounds", steps=16,
                      ssl={**ROUNDS, "max_class_share": 0.5, "precision_floor": 0.0, "target_precision": 0.01},
                      run={"checkpoint_every": 8, "eval_every": 8})
    res = semifer.train(cfg)
    alg = load_checkpoint(res.run_dir / "checkpoints" / "last.pt")["algorithm"]
    counts, n = alg["labeled_counts"].float(), alg["accepted"].numel()
    quota = (0.5 * counts / counts.sum() * n).floor()
    acc = torch.bincount(alg["pseudo"][alg["accepted"]], minlength=8)[:8].float()
    # Target precision 0.01 and floor 0 accept almost every face; the quota holds each class to half its share.
    assert (acc <= quota + 2).all(), (acc, quota)
    assert acc.sum() < 0.6 * n
    recs = [r for r in read_metrics(res.run_dir) if r["kind"] == "round"]
    assert recs and any(0.0 < t < 1.0 for t in recs[-1]["thresholds"])


def test_evidence_quota_shrinks_what_a_round_accepts_by_the_held_out_counts(tiny_data, tmp_path):
    accepted = {}
    for k in (0, 1000):
        cfg = tiny_config(tiny_data, tmp_path / f"eq{k}", algorithm="dtm_rounds", steps=16,
                          ssl={**ROUNDS, "max_class_share": 0.5, "precision_floor": 0.0, "target_precision": 0.01,
                               "evidence_quota": k},
                          run={"checkpoint_every": 8, "eval_every": 8})
        res = semifer.train(cfg)
        alg = load_checkpoint(res.run_dir / "checkpoints" / "last.pt")["algorithm"]
        accepted[k] = torch.bincount(alg["pseudo"][alg["accepted"]], minlength=8)[:8]
    # k = 1000 held-out faces per class is far more than the tiny slice holds: every quota
    # shrinks to a few faces (or 0: that class closes), so far fewer faces pass than with the plain quota.
    assert accepted[1000].sum() * 4 <= accepted[0].sum(), accepted
    assert accepted[0].sum() > 0


def test_round_partition_labels_each_part_once_and_keeps_earlier_labels(tiny_data, tmp_path):
    ssl = {**ROUNDS, "round_partition": True, "target_precision": 0.13, "precision_floor": 0.0}   # a weak tiny teacher
    cfg = tiny_config(tiny_data, tmp_path / "p", algorithm="dtm_rounds", steps=16, ssl=ssl,
                      run={"checkpoint_every": 4, "eval_every": 8})
    semifer.train(cfg, stop_after=12)                           # round 0 labelled at step 10
    r0 = load_checkpoint(tmp_path / "p" / "checkpoints" / "last.pt")["algorithm"]
    part = r0["part"].long()
    assert int(r0["round"]) == 0 and set(part.unique().tolist()) == {0, 1}
    assert r0["accepted"].any() and bool((part[r0["accepted"]] == 0).all())   # round 0 labels part 0 only
    semifer.train(cfg)
    r1 = load_checkpoint(tmp_path / "p" / "checkpoints" / "last.pt")["algorithm"]
    assert int(r1["round"]) == 1 and torch.equal(r1["part"], r0["part"])
    assert bool(r1["accepted"][r0["accepted"]].all())                         # earlier faces stay accepted
    assert torch.equal(r1["pseudo"][r0["accepted"]], r0["pseudo"][r0["accepted"]])   # with their labels
    new = r1["accepted"] & ~r0["accepted"]
    assert new.any() and bool((part[new] == 1).all())                         # round 1 adds part 1 only


def test_option_buffers_fill_in_when_a_checkpoint_lacks_them():
    """A stage-0 checkpoint made without round_partition / stream_prior_correction /
    holdout_evidence loads into a dtm_rounds that has them (benchmarks/fer2013_trial.py --fork)."""
    from semifer.config import SSLConfig
    plain = ALGORITHMS.get("dtm_rounds")(SSLConfig(rounds=3), 8, torch.ones(8), num_unlabeled=60)
    full_cfg = SSLConfig(rounds=3, round_partition=True, stream_prior_correction=True, holdout_evidence=5.0)
    full = ALGORITHMS.get("dtm_rounds")(full_cfg, 8, torch.ones(8), num_unlabeled=60)
    want_part = full.part.clone()
    state = plain.state_dict()
    assert not {"part", "stream_log_ratio", "policy.held_count"} & set(state)
    full.load_state_dict(state)
    assert torch.equal(full.part, want_part) and set(full.part.tolist()) == {0, 1, 2}
    assert full.stream_log_ratio.abs().sum() == 0 and full.policy.held_count.sum() == 0
    # a checkpoint that has them keeps its own values
    other = full.state_dict()
    other["stream_log_ratio"] = torch.full((8,), 0.5)
    full.load_state_dict(other)
    assert torch.equal(full.stream_log_ratio, torch.full((8,), 0.5))


class _TableTeacher(torch.nn.Module):
    """Logits looked up by each (constant) image's pixel value: a teacher whose answers a test sets."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, x):
        return self.table[(x[:, 0, 0, 0] * 255).round().long()]


def test_round_ensemble_averages_each_round_with_the_last_rounds_targets():
    from types import SimpleNamespace

    from semifer.config import SSLConfig
    from semifer.ssl.context import StepContext

    C, n, h = 8, 60, 40
    images = lambda lo, k: torch.arange(lo, lo + k, dtype=torch.uint8)[:, None, None, None].expand(k, 1, 4, 4).clone()
    class Held(SimpleNamespace):
        def __len__(self):
            return len(self.labels)

    unlabeled = SimpleNamespace(images=images(0, n))
    holdout = Held(images=images(100, h), labels=torch.arange(h) % C)

    def run(a):
        alg = ALGORITHMS.get("dtm_rounds")(SSLConfig(rounds=2, warmup_steps=0, pseudo_targets="soft", round_ensemble=a,
                                                     target_precision=0.3, precision_floor=0.0), C, torch.ones(C), num_unlabeled=n)
        alg.bind(unlabeled=unlabeled, holdout=holdout)
        seen = []
        for step, seed in ((0, 1), (5, 2)):
            table = 3 * torch.randn(256, C, generator=torch.Generator().manual_seed(seed))
            table[100:100 + h] += 4 * torch.nn.functional.one_hot(holdout.labels, C)   # a teacher worth calibrating
            ctx = StepContext(_TableTeacher(table), torch.device("cpu"), None, total_steps=10)
            alg.before_step(step, ctx)
            own = alg.policy.calibrated(table[:n].softmax(1))   # this round's teacher alone, as calibrated now
            seen.append((own, alg.targets.float().clone()))
        return seen

    (own0, t0), (own1, t1) = run(0.5)
    torch.testing.assert_close(t0, own0, atol=2e-3, rtol=0)                    # round 0: nothing to average
    torch.testing.assert_close(t1, 0.5 * own1 + 0.5 * t0, atol=2e-3, rtol=0)   # round 1: half the last round's
    assert (t1 - own1).abs().max() > 0.05
    (_, _), (own1_off, t1_off) = run(0.0)
    torch.testing.assert_close(t1_off, own1_off, atol=2e-3, rtol=0)            # off: the round's teacher alone
    with pytest.raises(ValueError, match="soft"):
        ALGORITHMS.get("dtm_rounds")(SSLConfig(round_ensemble=0.5, pseudo_targets="hard"), C, torch.ones(C), num_unlabeled=n)


def test_pseudo_mixup_mixes_each_face_with_the_next_and_draws_the_same_weights_again():
    from semifer.ssl.rounds import mix_pairs, mixup_weights
    idx = torch.tensor([7, 3, 11, 3, 0, 42])
    lam = mixup_weights(1.0, 5, idx)
    assert lam.shape == (6,) and (lam >= 0.5).all() and (lam <= 1).all() and lam.std() > 0
    assert torch.equal(lam, mixup_weights(1.0, 5, idx))              # what a resumed run draws
    assert not torch.equal(lam, mixup_weights(1.0, 6, idx))          # a new step, new weights
    x = torch.rand(6, 1, 4, 4)
    t = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3, 4, 5]), 8).float()
    xm, tm = mix_pairs(x, t, lam)
    for i in range(6):
        j = (i - 1) % 6                                              # partner: the previous face of the batch
        torch.testing.assert_close(xm[i], lam[i] * x[i] + (1 - lam[i]) * x[j])
        assert tm[i, i].item() == pytest.approx(lam[i].item()) and tm[i, j].item() == pytest.approx(1 - lam[i].item())
    torch.testing.assert_close(tm.sum(1), torch.ones(6))


def test_pseudo_mixup_trains_differently_and_resumes_mid_round_exactly(rounds_run, tiny_data, tmp_path):
    def cfg(out):
        return tiny_config(tiny_data, out, algorithm="dtm_rounds", steps=16, ssl={**ROUNDS, "pseudo_mixup": 1.0},
                           run={"checkpoint_every": 4, "eval_every": 4})
    full = semifer.train(cfg(tmp_path / "full"))
    part = semifer.train(cfg(tmp_path / "part"), stop_after=15)   # stopped inside round 1, pseudo-labels in use
    assert not part.completed
    assert semifer.train(cfg(tmp_path / "part")).completed
    _assert_same_state(full.run_dir / "checkpoints" / "last.pt", tmp_path / "part" / "checkpoints" / "last.pt")
    a = load_checkpoint(full.run_dir / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(rounds_run.run_dir / "checkpoints" / "last.pt")["model"]
    assert any(not torch.equal(a[k], b[k]) for k in a)               # the option changed what was learned
    from semifer.config import SSLConfig
    for bad, match in (({"pseudo_mixup": -1.0}, ">= 0"), ({"pseudo_mixup": 1.0, "round_consistency": 1.0}, "round_consistency")):
        with pytest.raises(ValueError, match=match):
            ALGORITHMS.get("dtm_rounds")(SSLConfig(**bad), 8, torch.ones(8), num_unlabeled=10)
