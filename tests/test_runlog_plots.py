"""Tests for semifer.engine.runlog (RunLogger, read_metrics) and semifer.engine.plots."""
from __future__ import annotations

import json
import logging
import math
import time

import numpy as np
import pytest
import torch
from PIL import Image

from semifer.engine.plots import plot_confusion, write_plots
from semifer.engine.runlog import RunLogger, read_metrics
from semifer.labels import ABAW_LABELS


def _lines(run_dir):
    return (run_dir / "metrics.jsonl").read_text().splitlines()


# --------------------------------------------------------------------------- runlog
def test_jsonl_round_trip_converts_tensors_numpy_and_nan(tmp_path):
    conf = np.arange(64, dtype=np.int64).reshape(8, 8)
    with RunLogger(tmp_path, tensorboard=False) as lg:
        lg.log({
            "step": np.int64(3), "kind": "train",
            "loss": torch.tensor(0.25), "lr": np.float32(0.5),
            "thresholds": torch.linspace(0, 0.7, 8),
            "nan": float("nan"), "inf": np.float64("inf"),
            "vec": torch.tensor([1.0, float("nan")]),
            "flag": np.bool_(True), "name": "x",
        })
        # Flushed per record: readable while the logger is still open.
        assert len(_lines(tmp_path)) == 1
        lg.log({"step": 4, "kind": "eval", "confusion": torch.from_numpy(conf),
                "per_class_f1": {n: np.float32(i / 10) for i, n in enumerate(ABAW_LABELS)}})

    for line in _lines(tmp_path):
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    train, ev = read_metrics(tmp_path)
    assert train["step"] == 3 and type(train["step"]) is int
    assert train["loss"] == 0.25 and train["lr"] == 0.5
    assert train["thresholds"] == pytest.approx([i * 0.1 for i in range(8)])
    assert train["nan"] is None and train["inf"] is None
    assert train["vec"] == [1.0, None]
    assert train["flag"] is True and train["name"] == "x"
    assert isinstance(train["time"], float)
    assert ev["confusion"] == conf.tolist()
    assert ev["per_class_f1"]["Other"] == pytest.approx(0.7)


def test_log_validates_record_and_does_not_mutate(tmp_path):
    rec = {"step": 1, "kind": "train", "loss": 1.0}
    with RunLogger(tmp_path, tensorboard=False) as lg:
        lg.log(rec)
        with pytest.raises(ValueError):
            lg.log({"kind": "train"})
        with pytest.raises(ValueError):
            lg.log({"step": 1.5, "kind": "train"})
    assert rec == {"step": 1, "kind": "train", "loss": 1.0}
    with pytest.raises(ValueError):
        lg.log(rec)  # after close


def test_disabled_logger_writes_nothing(tmp_path):
    run = tmp_path / "run"
    lg = RunLogger(run, enabled=False, resume_step=3)
    lg.log({"step": 1, "kind": "train", "loss": 1.0})
    lg.log({"no": "validation either"})
    lg.close()
    assert not run.exists()


def test_truncated_last_line_is_tolerated_and_resume_appends_cleanly(tmp_path, caplog):
    with RunLogger(tmp_path, tensorboard=False) as lg:
        for s in range(1, 6):
            lg.log({"step": s, "kind": "train", "loss": float(s)})
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 6, "kind": "train", "lo')  # killed mid-write
    with caplog.at_level(logging.WARNING):
        recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    assert "skipped 1 " in caplog.text

    # Resuming must not glue its resume marker onto the fragment (the marker would be
    # lost and stale step 5 would survive).
    caplog.clear()
    with RunLogger(tmp_path, resume_step=3, tensorboard=False) as lg:
        lg.log({"step": 4, "kind": "train", "loss": 44.0})
    with caplog.at_level(logging.WARNING):
        recs = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in recs] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 44.0)]
    assert "skipped 1 " in caplog.text


def test_resume_drops_redone_and_stale_steps(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as lg:
        lg.log({"step": 0, "kind": "info", "msg": "a"})
        lg.log({"step": 0, "kind": "info", "msg": "b"})
        for s in range(1, 11):
            lg.log({"step": s, "kind": "train", "loss": float(s)})
        lg.log({"step": 5, "kind": "eval", "macro_f1": 0.5})
        lg.log({"step": 10, "kind": "eval", "macro_f1": 0.9})
    with RunLogger(tmp_path, resume_step=5, tensorboard=False) as lg:
        for s in range(6, 9):
            lg.log({"step": s, "kind": "train", "loss": 100.0 + s})
        lg.log({"step": 8, "kind": "eval", "macro_f1": 0.6})

    recs = read_metrics(tmp_path)
    train = [(r["step"], r["loss"]) for r in recs if r["kind"] == "train"]
    # 9 and 10 were logged before the resume at 5: stale, even though not re-logged.
    assert train == [(s, float(s)) for s in range(1, 6)] + [(s, 100.0 + s) for s in (6, 7, 8)]
    assert [(r["step"], r["macro_f1"]) for r in recs if r["kind"] == "eval"] == [(5, 0.5), (8, 0.6)]
    assert [r["msg"] for r in recs if r["kind"] == "info"] == ["a", "b"]  # events not de-duplicated
    assert [r["step"] for r in recs] == sorted(r["step"] for r in recs)
    assert not any(r["kind"] == "resume" for r in recs)
    assert [r["step"] for r in read_metrics(tmp_path, include_markers=True)
            if r["kind"] == "resume"] == [5]

    # A second, earlier resume supersedes the first resumed segment too.
    with RunLogger(tmp_path, resume_step=2, tensorboard=False) as lg:
        lg.log({"step": 3, "kind": "train", "loss": -3.0})
    train = [(r["step"], r["loss"]) for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert train == [(1, 1.0), (2, 2.0), (3, -3.0)]

    # Re-logging the resume step itself: the later record wins.
    with RunLogger(tmp_path, resume_step=3, tensorboard=False) as lg:
        lg.log({"step": 3, "kind": "train", "loss": 33.0})
    assert read_metrics(tmp_path)[-1]["loss"] == 33.0

    # A fresh start (no resume_step) over an existing log supersedes all of it.
    with RunLogger(tmp_path, tensorboard=False) as lg:
        lg.log({"step": 1, "kind": "train", "loss": 7.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 7.0)]


def test_corrupt_middle_line_is_skipped(tmp_path, caplog):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "kind": "train", "loss": 1}\n'
        'garbage\n'
        '[1, 2]\n'
        '{"kind": "train", "loss": 2}\n'
        '{"step": 3, "kind": "train", "loss": 3}\n'
    )
    with caplog.at_level(logging.WARNING):
        recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 3]
    assert "skipped 3 " in caplog.text
    with pytest.raises(FileNotFoundError):
        read_metrics(tmp_path / "nope")


def _tb_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return acc


def test_tensorboard_scalar_tags(tmp_path):
    with RunLogger(tmp_path) as lg:
        lg.log({"step": 0, "kind": "info", "config": {"lr": 0.1, "method": "fixmatch"}})
        for s in (1, 2):
            lg.log({"step": s, "kind": "train", "loss": torch.tensor(1.0 / s),
                    "thresholds": [0.9] * 8, "mask_rate": 0.5, "name": "skip me"})
        lg.log({"step": 2, "kind": "eval", "macro_f1": 0.4, "confusion": [[1] * 8] * 8,
                "per_class_f1": dict(zip(ABAW_LABELS, np.linspace(0, 1, 8))),
                "bad": float("nan"), "short": [1.0, 2.0]})
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    tags = set(_tb_scalars(tmp_path).Tags()["scalars"])
    expected = {"train/loss", "train/mask_rate", "eval/macro_f1", "eval/bad"}
    expected |= {f"train/thresholds/{n}" for n in ABAW_LABELS}
    expected |= {f"eval/per_class_f1/{n}" for n in ABAW_LABELS}
    assert expected <= tags
    assert not any("confusion" in t or "short" in t or "name" in t or "config" in t or
                   "time" in t for t in tags)
    ev = _tb_scalars(tmp_path).Scalars("train/loss")
    assert [(e.step, e.value) for e in ev] == [(1, 1.0), (2, 0.5)]


def test_tensorboard_resume_purges_redone_steps(tmp_path):
    with RunLogger(tmp_path) as lg:
        for s in range(1, 11):
            lg.log({"step": s, "kind": "train", "loss": float(s)})
    time.sleep(1.1)  # event file names carry a 1-second timestamp; keep them ordered
    with RunLogger(tmp_path, resume_step=5) as lg:
        for s in range(6, 9):
            lg.log({"step": s, "kind": "train", "loss": 100.0 + s})
    got = [(e.step, e.value) for e in _tb_scalars(tmp_path).Scalars("train/loss")]
    assert got == [(s, float(s)) for s in range(1, 6)] + [(s, 100.0 + s) for s in (6, 7, 8)]


# --------------------------------------------------------------------------- plots
def _check_png(path, min_w=400, min_h=250):
    assert path.is_file() and path.stat().st_size > 5_000
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
        assert w >= min_w and h >= min_h
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100  # not a blank canvas


def _synthetic_ssl_log(run_dir, n_train=2000, every_eval=100, ssl=True):
    rng = np.random.default_rng(0)
    with RunLogger(run_dir, tensorboard=False) as lg:
        lg.log({"step": 0, "kind": "info", "method": "flexmatch" if ssl else "supervised"})
        for s in range(1, n_train + 1):
            rec = {"step": s, "kind": "train", "loss_x": 2.0 * math.exp(-s / 500) + 0.1 * rng.random()}
            if ssl:
                rec["loss_u"] = 0.5 * (1 - math.exp(-s / 300)) + 0.05 * rng.random()
                rec["loss"] = rec["loss_x"] + rec["loss_u"]
                rec["thresholds"] = [0.95 * (1 - math.exp(-s / (200 + 60 * c))) for c in range(8)]
                if s % 3:  # keys can be missing in some records
                    rec["mask_rate"] = min(1.0, s / n_train + 0.05)
                    mix = rng.dirichlet(np.ones(8) * 5)
                    rec["pseudo_class_mix"] = mix.tolist() if s > 20 else [0.0] * 8
                    rec["pseudo_acc"] = 0.5 + 0.4 * s / n_train
            else:
                rec["loss"] = rec["loss_x"]
            lg.log(rec)
            if s % every_eval == 0:
                cm = rng.integers(0, 20, size=(8, 8)) + np.diag(rng.integers(20, 80, size=8))
                cm[7] = 0  # a class with no test samples
                lg.log({"step": s, "kind": "eval", "macro_f1": 0.3 + 0.4 * math.sin(s / n_train * 2.5),
                        "accuracy": 0.5 + 0.2 * s / n_train, "confusion": cm})


def test_write_plots_ssl_run(tmp_path):
    _synthetic_ssl_log(tmp_path)
    t0 = time.perf_counter()
    paths = write_plots(tmp_path)
    elapsed = time.perf_counter() - t0
    names = [p.name for p in paths]
    assert names == ["thresholds.png", "pseudo_labels.png", "macro_f1.png", "loss.png", "confusion.png"]
    for p in paths:
        assert p.parent == tmp_path / "plots"
        _check_png(p)
    assert elapsed < 5.0, f"write_plots took {elapsed:.1f}s for 2000 train records"


def test_write_plots_supervised_run_skips_ssl_plots(tmp_path):
    _synthetic_ssl_log(tmp_path, n_train=300, every_eval=50, ssl=False)
    paths = write_plots(tmp_path)
    assert [p.name for p in paths] == ["macro_f1.png", "loss.png", "confusion.png"]
    assert not (tmp_path / "plots" / "thresholds.png").exists()
    assert not (tmp_path / "plots" / "pseudo_labels.png").exists()
    for p in paths:
        _check_png(p)


def test_write_plots_with_only_info_records(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as lg:
        lg.log({"step": 0, "kind": "info", "msg": "started"})
    assert write_plots(tmp_path) == []


def test_plot_confusion_standalone(tmp_path):
    cm = torch.tensor([[5, 1, 0], [0, 0, 0], [2, 2, 6]])
    p = plot_confusion(cm, tmp_path / "sub" / "cm.png", title="test", class_names=["a", "b", "c"])
    _check_png(p, min_w=250, min_h=200)
    with pytest.raises(ValueError):
        plot_confusion([[1, 2, 3]], tmp_path / "bad.png")
