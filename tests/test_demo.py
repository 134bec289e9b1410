"""The demo command end to end (a few steps), and the shipped demo config matching it."""
import json
from pathlib import Path

import yaml

from semifer.config import load_config, to_dict
from semifer.demo import demo_config, run_demo

ROOT = Path(__file__).resolve().parents[1]


def test_demo_writes_results_and_plots(tmp_path, capsys):
    summary = run_demo(tmp_path, algorithms=["supervised", "dtm"], steps=4)
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["algorithms"]) == {"supervised", "dtm"}
    for name, r in data["algorithms"].items():
        assert 0.0 <= r["macro_f1"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0
        assert r["steps"] == 4
        assert (Path(r["run_dir"]) / "plots" / "macro_f1.png").exists()
        # Chosen on synthetic:val, reported on synthetic:test (issue 13).
        run = json.loads((Path(r["run_dir"]) / "results.json").read_text())
        assert run["val"] == "synthetic:val" and run["test"]["data"] == "synthetic:test"
        assert run["test"]["checkpoint_step"] == run["best_step"] == r["best_step"]
        assert r["macro_f1"] == run["test"]["macro_f1"] and r["val_macro_f1"] == run["macro_f1"]
    assert data["wall_s"] > 0 and summary["algorithms"]["dtm"]["macro_f1"] == data["algorithms"]["dtm"]["macro_f1"]
    out = capsys.readouterr().out
    assert "| supervised |" in out and "| dtm |" in out


def test_shipped_config_is_the_demo_config(tmp_path):
    shipped = load_config(ROOT / "configs" / "demo_dtm.yaml", overrides=[f"run.out={tmp_path}/dtm"])
    assert to_dict(shipped) == to_dict(demo_config("dtm", tmp_path))
    assert yaml.safe_load((ROOT / "configs" / "demo_dtm.yaml").read_text())["ssl"]["algorithm"] == "dtm"
