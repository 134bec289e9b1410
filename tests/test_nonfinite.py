"""Numerical faults: a step with a non-finite loss is skipped and counted; a diverged run stops intact."""
import pytest
import torch

import semifer
from semifer.engine.checkpoint import load_checkpoint
from semifer.engine.guard import NonFiniteGuard, NonFiniteTrainingError
from semifer.engine.runlog import read_metrics
from semifer.ssl.dtm_online import DTM
from tests.conftest import tiny_config

pytestmark = pytest.mark.faults


def _poison(monkeypatch, bad_steps):
    original = DTM.step

    def step(self, student, teacher, batch, step):
        loss, logs = original(self, student, teacher, batch, step)
        if bad_steps(step):
            loss = loss * float("nan")
        return loss, logs

    monkeypatch.setattr(DTM, "step", step)


def test_nonfinite_step_is_skipped_counted_and_leaves_the_weights_alone(tiny_data, tmp_path, monkeypatch):
    _poison(monkeypatch, lambda s: s in (1, 3))
    # progress on: the bar must show a skipped step's null loss without crashing
    cfg = tiny_config(tiny_data, tmp_path / "run", steps=4, run={"progress": True, "log_every": 1})
    semifer.train(cfg, stop_after=3)
    before = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    res = semifer.train(cfg)                      # resumes; step index 3 is poisoned
    after = load_checkpoint(res.run_dir / "checkpoints" / "last.pt")
    assert res.completed and after["step"] == 4
    assert after["nonfinite"] == {"total": 2, "consecutive": 1}
    for key in ("model", "ema"):
        for name, t in after[key].items():
            assert torch.equal(t, before[key][name]), f"{key}.{name} changed in a skipped step"
            assert not t.is_floating_point() or torch.isfinite(t).all()
    logged = [r["nonfinite_skipped"] for r in read_metrics(res.run_dir) if "nonfinite_skipped" in r]
    assert logged and max(logged) == 2


def test_diverged_run_stops_with_its_last_checkpoint_intact(tiny_data, tmp_path, monkeypatch):
    _poison(monkeypatch, lambda s: s >= 4)
    cfg = tiny_config(tiny_data, tmp_path / "run", steps=12, optim={"max_nonfinite_steps": 3})
    with pytest.raises(NonFiniteTrainingError, match="3 consecutive steps"):
        semifer.train(cfg)
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ck["step"] == 6                       # written at step 6 (3 good + 2 skipped steps), before the stop
    assert all(torch.isfinite(t).all() for t in ck["model"].values() if t.is_floating_point())


def test_guard_counts_and_rejects_a_bad_limit():
    g = NonFiniteGuard(limit=2)
    assert g.step_ok(torch.tensor(1.0), torch.tensor(2.0), 0)
    assert not g.step_ok(torch.tensor(float("inf")), torch.tensor(2.0), 1)
    assert g.step_ok(torch.tensor(1.0), torch.tensor(1.0), 2)      # a good step resets the run of bad ones
    assert not g.step_ok(torch.tensor(1.0), torch.tensor(float("nan")), 3)
    with pytest.raises(NonFiniteTrainingError):
        g.step_ok(torch.tensor(float("nan")), torch.tensor(1.0), 4)
    assert g.state_dict() == {"total": 3, "consecutive": 2}
    with pytest.raises(ValueError):
        NonFiniteGuard(0)
