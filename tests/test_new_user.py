"""A new user's first hour (issue 13): their data is never mixed with the demo's, checkpoints
are chosen on validation data and scored on test data, errors name what is wrong, and a
failed start never blocks the corrected command."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from semifer.cli import main
from semifer.labels import ABAW_LABELS
from tests.conftest import stripes

STEPS = ["--steps", "2", "--set", "run.eval_every=1", "--set", "run.progress=false",
         "--set", "model.backbone_args={width: 8}", "--set", "data.image_size=24", "--set", "optim.batch_size=8"]


def image_folder(root: Path, per_class: int = 10, seed: int = 0) -> Path:
    """A ``folder:`` dataset: one sub-folder of PNGs per ABAW class."""
    images, labels = stripes(per_class, seed)
    for i, (img, y) in enumerate(zip(images, labels)):
        d = root / ABAW_LABELS[y]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i}.png")
    return root


def test_user_data_is_never_mixed_with_demo_faces(tmp_path, capsys):
    mine = image_folder(tmp_path / "mine")
    out = tmp_path / "run"
    assert main(["train", "--labeled", f"folder:{mine}", "--algorithm", "supervised", "--out", str(out), *STEPS]) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert "synthetic" not in json.dumps(cfg["data"]["labeled"]) + json.dumps(cfg["data"]["unlabeled"])
    assert cfg["data"]["val"] == "" and cfg["data"]["test"] == ""
    split = json.loads((out / "split.json").read_text())
    val = split["val"]
    # Class-stratified: 10 % of 10 faces = 1 per class, disjoint from what was trained on.
    assert len(val) == len(ABAW_LABELS) and not set(val) & set(split["labeled"])
    assert sorted(val + split["labeled"] + split["rest"]) == list(range(10 * len(ABAW_LABELS)))
    info = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    info = next(r for r in info if r.get("kind") == "info")
    assert info["val"] == 8 and info["labeled"] == 72
    printed = capsys.readouterr().out
    assert f"folder:{mine}: 72 images" in printed and "8 images (checkpoint selection)" in printed
    results = json.loads((out / "results.json").read_text())
    assert "split.json" in results["val"] and "test" not in results


def test_ssl_on_user_data_needs_named_unlabeled_data(tmp_path, capsys):
    mine = image_folder(tmp_path / "mine")
    rc = main(["train", "--labeled", f"folder:{mine}", "--algorithm", "fixmatch", "--out", str(tmp_path / "r"), *STEPS])
    assert rc == 2
    assert "set data.unlabeled" in capsys.readouterr().err
    # With a labeled fraction, the unlabeled set is exactly the rest of the user's split.
    out = tmp_path / "r2"
    assert main(["train", "--labeled", f"folder:{mine}", "--algorithm", "fixmatch", "--out", str(out),
                 "--set", "data.labeled_fraction=0.5", *STEPS]) == 0
    info = next(json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"info"' in x)
    assert info["unlabeled"] == 72 - info["labeled"]


def test_empty_folder_names_the_source_and_retry_is_not_blocked(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "run"
    assert main(["train", "--labeled", f"folder:{empty}", "--algorithm", "supervised", "--out", str(out), *STEPS]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "data.labeled" in err
    mine = image_folder(tmp_path / "mine")
    assert main(["train", "--labeled", f"folder:{mine}", "--algorithm", "supervised", "--out", str(out), *STEPS]) == 0
    assert (out / "config.yaml.prev").exists() and (out / "results.json").exists()
    # An empty unlabeled folder is named too.
    rc = main(["train", "--labeled", f"folder:{mine}", "--unlabeled", f"images:{empty}", "--algorithm", "fixmatch",
               "--out", str(tmp_path / "r3"), *STEPS])
    assert rc == 2 and f"images:{empty}" in capsys.readouterr().err


def test_run_with_checkpoint_still_refuses_a_different_config(tmp_path, capsys):
    mine = image_folder(tmp_path / "mine")
    out = tmp_path / "run"
    assert main(["train", "--labeled", f"folder:{mine}", "--algorithm", "supervised", "--out", str(out), *STEPS]) == 0
    assert main(["train", "--labeled", f"folder:{mine}", "--algorithm", "supervised", "--out", str(out), *STEPS,
                 "--set", "optim.lr=0.5"]) == 2
    assert "different config" in capsys.readouterr().err


def test_test_set_is_scored_with_the_checkpoint_chosen_on_val(tmp_path, tiny_data):
    from semifer.engine import train
    from tests.conftest import tiny_config

    cfg = tiny_config(tiny_data, tmp_path / "run", "supervised", steps=6)
    cfg.data.test = tiny_data["val"].replace("val", "labeled")
    res = train(cfg)
    results = json.loads((res.run_dir / "results.json").read_text())
    assert results["test"]["checkpoint_step"] == res.best_step == results["best_step"]
    assert results["test"]["data"] == cfg.data.test and res.test["macro_f1"] == results["test"]["macro_f1"]
    # The scores are the selected checkpoint's on the test data, recomputed from best.pt here.
    from semifer.eval.report import evaluate_path
    again = evaluate_path(res.run_dir, cfg.data.test)
    assert again["macro_f1"] == pytest.approx(results["test"]["macro_f1"], abs=1e-6)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("semifer ")


def test_threads_come_from_allowed_cpus(monkeypatch):
    from semifer.engine import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "allowed_cpus", lambda: 2)
    monkeypatch.setattr(threads, "busy_cpus", lambda: 1)
    assert threads.choose_threads()[0] == 1          # one of two cores busy: one thread
    monkeypatch.setattr(threads, "busy_cpus", lambda: 0)
    assert threads.choose_threads()[0] == 2
    monkeypatch.setattr(threads, "busy_cpus", lambda: 5)
    assert threads.choose_threads()[0] == 1          # never zero
    assert threads.choose_threads(3) == (3, "run.threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert threads.choose_threads()[0] == 4


def test_cgroup_quota_caps_cpus(monkeypatch, tmp_path):
    from semifer.engine import threads

    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 1.5)
    assert threads.allowed_cpus() == 1
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    assert threads.allowed_cpus() >= 1


def test_unknown_data_never_defaults_to_synthetic_when_labeled_given():
    from semifer.config import load_config

    cfg = load_config(overrides=["data.labeled=folder:/x"])
    assert (cfg.data.unlabeled, cfg.data.val, cfg.data.test) == ([], "", "")
    demo = load_config()
    assert demo.data.val == "synthetic:val" and demo.data.test == "synthetic:test"
    assert np.all([s.startswith("synthetic:") for s in [demo.data.labeled, *demo.data.unlabeled]])
