"""The ``semifer`` console command, run as a user would (subprocesses)."""
import json
import os
import subprocess
import sys

from semifer.registry import ALGORITHMS


def run_cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "semifer.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_algorithms_lists_the_registry():
    r = run_cli("algorithms")
    assert r.returncode == 0, r.stderr
    listed = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    assert listed == ALGORITHMS.names()
    assert {"supervised", "fixmatch", "flexmatch", "freematch", "dtm"} <= set(listed)


def test_other_registries_list():
    for kind, expected in (("backbones", "small_cnn"), ("formats", "synthetic"), ("thresholds", "dtm")):
        r = run_cli(kind)
        assert r.returncode == 0 and expected in r.stdout, r.stderr


def test_train_then_evaluate(tiny_data, tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", "--algorithm", "fixmatch", "--out", str(out), "--steps", "4",
                "--labeled", tiny_data["labeled"], "--unlabeled", tiny_data["unlabeled"], "--val", tiny_data["val"],
                "--set", "data.image_size=24", "--set", "model.backbone_args={width: 8}",
                "--set", "optim.batch_size=16", "--set", "run.progress=false", "--set", "run.eval_every=2")
    assert r.returncode == 0, r.stderr
    assert "best macro-F1" in r.stdout
    trained = json.loads((out / "results.json").read_text())
    e = run_cli("evaluate", str(out), "--out", str(tmp_path / "eval"))
    assert e.returncode == 0, e.stderr
    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())
    assert abs(scores["macro_f1"] - trained["macro_f1"]) < 1e-6  # re-scoring the best checkpoint agrees
    assert "macro-F1" in e.stdout and (tmp_path / "eval" / "confusion.png").exists()


def test_bad_config_key_is_a_clear_error(tmp_path):
    r = run_cli("train", "--out", str(tmp_path / "x"), "--set", "ssl.tua=0.9")
    assert r.returncode == 2
    assert "unknown key(s) in ssl: tua" in r.stderr
    assert not (tmp_path / "x").exists()


def test_evaluate_missing_checkpoint(tmp_path):
    r = run_cli("evaluate", str(tmp_path))
    assert r.returncode == 2 and "best.pt" in r.stderr
