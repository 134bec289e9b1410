"""Bad files in a real-format data set are skipped, counted and reported; bad annotations stop early."""
import json

import numpy as np
import pytest
from PIL import Image

import semifer
from semifer.engine.runlog import read_metrics
from tests.conftest import stripes, tiny_config

pytestmark = pytest.mark.badinput


def write_folder(root, n_per_class, seed):
    images, labels = stripes(n_per_class, seed, classes=8)
    names = ["neutral", "angry", "disgust", "fear", "happy", "sad", "surprise", "other"]
    for i, (a, y) in enumerate(zip(images, labels)):
        d = root / names[y]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(d / f"{i:04d}.png")
    return root


def test_corrupt_files_are_skipped_counted_and_reported(tiny_data, tmp_path, capsys):
    lab = write_folder(tmp_path / "lab", 4, seed=11)
    (lab / "happy" / "zero.jpg").write_bytes(b"")
    (lab / "sad" / "junk.jpg").write_bytes(b"this is not an image")
    (lab / "fear" / "cut.jpg").write_bytes(np.random.default_rng(0).bytes(10))
    cfg = tiny_config(tiny_data, tmp_path / "run", algorithm="supervised", steps=2,
                      data={"labeled": f"folder:{lab}"})
    res = semifer.train(cfg)
    results = json.loads((res.run_dir / "results.json").read_text())
    counts = results["skipped"][f"folder:{lab}"]
    assert sum(counts.values()) == 3 and counts.get("empty file") == 1
    info = [r for r in read_metrics(res.run_dir) if r["kind"] == "info"][0]
    assert info["labeled"] == 32 and sum(info["skipped"][f"folder:{lab}"].values()) == 3
    assert "skipped 3 unusable inputs" in capsys.readouterr().out


def test_malformed_manifest_stops_before_training(tiny_data, tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (24, 24)).save(img)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\na.png,happy\na.png,happy,extra,columns\n")
    cfg = tiny_config(tiny_data, tmp_path / "run", algorithm="supervised", steps=2,
                      data={"labeled": f"csv:{manifest}"})
    with pytest.raises(ValueError, match=r"m\.csv:3"):
        semifer.train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
