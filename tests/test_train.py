"""The Python API really trains; runs resume exactly and are never overwritten."""
import json

import pytest
import torch

import semifer
from semifer.engine.checkpoint import load_checkpoint
from semifer.engine.rundir import RunDirConflict
from semifer.engine.runlog import read_metrics
from tests.conftest import tiny_config


def test_train_improves_the_metric(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "sup", algorithm="supervised", steps=60,
                      run={"eval_every": 10, "checkpoint_every": 30})
    res = semifer.train(cfg)
    evals = [r for r in read_metrics(res.run_dir) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20, 30, 40, 50, 60]
    assert res.macro_f1 == max(r["macro_f1"] for r in evals)
    assert res.macro_f1 > evals[0]["macro_f1"] + 0.1
    assert res.macro_f1 > 0.5  # chance is 0.125
    results = json.loads((res.run_dir / "results.json").read_text())
    assert results["macro_f1"] == pytest.approx(res.macro_f1)
    best = load_checkpoint(res.run_dir / "checkpoints" / "best.pt")
    assert best["step"] == res.best_step
    for name in ("thresholds.png", "pseudo_labels.png"):
        assert not (res.run_dir / "plots" / name).exists()  # supervised: nothing to plot
    for name in ("macro_f1.png", "confusion.png", "loss.png"):
        assert (res.run_dir / "plots" / name).stat().st_size > 1000
    assert (res.run_dir / "config.yaml").exists() and any((res.run_dir / "tensorboard").iterdir())


@pytest.mark.parametrize("algorithm, status_mode", [("dtm_flex", "indexed"), ("dtm_flex", "streamed"), ("dtm", "auto"),
                                                    ("freematch", "auto")])
def test_resume_is_exact(tiny_data, tmp_path, algorithm, status_mode):
    # dtm: calibrated at steps 0, 3, 6, 9 (the resumed part crosses one) with thresholds that open.
    kw = dict(algorithm=algorithm, steps=10, ssl={"status_mode": status_mode, "fairness_weight": 0.01,
                                                  "calib_every": 3, "target_precision": 0.2, "precision_floor": 0.0},
              run={"checkpoint_every": 4, "eval_every": 5})
    full = semifer.train(tiny_config(tiny_data, tmp_path / "full", **kw))
    part_cfg = tiny_config(tiny_data, tmp_path / "part", **kw)
    first = semifer.train(part_cfg, stop_after=6)
    assert not first.completed and first.steps == 6
    second = semifer.train(part_cfg)
    assert second.completed and second.steps == 10
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    for part in ("model", "ema", "algorithm"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    assert full.macro_f1 == second.macro_f1
    steps = [r["step"] for r in read_metrics(tmp_path / "part") if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 10


def test_existing_run_dir_with_other_config_is_refused(tiny_data, tmp_path):
    semifer.train(tiny_config(tiny_data, tmp_path / "r", algorithm="supervised", steps=2))
    before = sorted(p.name for p in (tmp_path / "r").rglob("*"))
    with pytest.raises(RunDirConflict, match="optim.lr"):
        semifer.train(tiny_config(tiny_data, tmp_path / "r", algorithm="supervised", steps=2, optim={"lr": 0.1}))
    assert sorted(p.name for p in (tmp_path / "r").rglob("*")) == before


def test_finished_run_is_not_retrained(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "r", algorithm="supervised", steps=3)
    res1 = semifer.train(cfg)
    mtime = (tmp_path / "r" / "checkpoints" / "last.pt").stat().st_mtime_ns
    res2 = semifer.train(cfg)
    assert res2.completed and res2.steps == 3 and res2.macro_f1 == res1.macro_f1
    assert (tmp_path / "r" / "checkpoints" / "last.pt").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("setting", [True, False])
def test_channels_last_setting_reaches_the_weights(tiny_data, tmp_path, setting):
    cfg = tiny_config(tiny_data, tmp_path / "run", steps=3, optim={"batch_size": 16, "steps": 3, "lr": 0.05,
                                                                    "channels_last": setting, "amp": "off"})
    res = semifer.train(cfg)
    ck = load_checkpoint(res.run_dir / "checkpoints" / "last.pt")
    convs = [v for k, v in ck["model"].items() if v.ndim == 4 and v.shape[1] > 1]
    assert convs
    assert all(w.is_contiguous(memory_format=torch.channels_last) == setting for w in convs)
    # The saved weights load into a plain (NCHW) model: only strides differ.
    from semifer.models import build_model
    build_model(cfg.model, 8, in_chans=cfg.data.channels).load_state_dict(ck["model"])


@pytest.mark.parametrize("view", ["weak", "strong", "reframe"])
def test_labeled_augment_chooses_the_labeled_view(tiny_data, tmp_path, monkeypatch, view):
    import semifer.engine.loop as loop

    seen = []

    def spy(name, real):
        return lambda x, *a, **k: seen.append((name, len(x))) or real(x, *a, **k)

    monkeypatch.setattr(loop, "LABELED_VIEWS", {name: spy(name, real) for name, real in loop.LABELED_VIEWS.items()})
    cfg = tiny_config(tiny_data, tmp_path / view, algorithm="supervised", steps=2,
                      data={"labeled_augment": view})
    semifer.train(cfg)
    assert seen == [(view, 16), (view, 16)]  # one labeled batch of 16 per step, in the chosen view


@pytest.mark.parametrize("erase", [0.0, 0.4])
def test_labeled_erase_hides_a_square_of_each_labeled_face_only_when_on(tiny_data, tmp_path, monkeypatch, erase):
    import semifer.engine.loop as loop

    calls = []
    real = loop.apply_cutout

    def spy(x, gen, cutout, **k):
        calls.append((len(x), cutout))
        return real(x, gen, cutout, **k)

    monkeypatch.setattr(loop, "apply_cutout", spy)
    cfg = tiny_config(tiny_data, tmp_path / "r", algorithm="supervised", steps=2, data={"labeled_erase": erase})
    semifer.train(cfg)
    # off: no call, so runs without it draw the same random stream as before the option existed
    assert calls == ([] if erase == 0 else [(16, erase), (16, erase)])


def test_labeled_erase_out_of_range_is_a_config_error(tiny_data, tmp_path):
    from semifer.config import ConfigError

    with pytest.raises(ConfigError, match="labeled_erase"):
        tiny_config(tiny_data, tmp_path / "r", algorithm="supervised", steps=2, data={"labeled_erase": 1.5})
