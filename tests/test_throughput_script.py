"""benchmarks/throughput.py on a tiny CPU config: JSON shape and positive, consistent rates."""
import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
RATES = ("model_bound_img_s", "device_pipeline_img_s", "cpu_pipeline_img_s", "threshold_update_ms", "step_ms")


def _load():
    spec = importlib.util.spec_from_file_location("throughput_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve the script's string annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_throughput_script_tiny_cpu(tmp_path, capsys):
    bench = _load()
    threads = bench.torch.get_num_threads()
    bench.torch.set_num_threads(1)  # tiny tensors: OpenMP barriers only cost time, badly so on a busy machine
    try:
        report = bench.main(["--out", str(tmp_path), "--device", "cpu", "--seconds", "0.3", "--size", "32",
                             "--batch", "4", "--mu", "1", "--backbones", "small_cnn,no_such_net", "--workers", "1",
                             "--warmup", "1", "--faces", "16"])
    finally:
        bench.torch.set_num_threads(threads)
    written = json.loads((tmp_path / "throughput.json").read_text())
    assert written == json.loads(json.dumps(report))
    assert written["device_type"] == "cpu" and written["torch"] and written["device"]
    (run,) = written["runs"]  # the unknown backbone is skipped, not fatal
    assert (run["backbone"], run["size"], run["batch"], run["mu"]) == ("small_cnn", 32, 4, 1)
    assert run["images_per_step"] == 4 * (1 + 2 * 1)
    for key in RATES:
        assert run[key] > 0, key
    assert abs(run["step_ms"] - 1000 * run["images_per_step"] / run["model_bound_img_s"]) < 1e-6
    assert abs(run["device_vs_cpu_pipeline"] - run["device_pipeline_img_s"] / run["cpu_pipeline_img_s"]) < 1e-9
    out = capsys.readouterr().out
    assert "skipping no_such_net" in out and "| small_cnn | 32 |" in out


def test_harmonic_mean_of_equal_windows(tmp_path, monkeypatch):
    """(b) averages equal-step windows by total images / total time, skipping the warm-up window."""
    bench = _load()
    # seconds 4 at 1 s/step: 4 measured steps logged every step after 1 warm-up step.
    records = [{"kind": "train", "step": 1, "img_per_s": 1.0},  # warm-up window: ignored
               {"kind": "train", "step": 2, "img_per_s": 100.0}, {"kind": "train", "step": 3, "img_per_s": 300.0}]

    class Result:
        run_dir = tmp_path

    monkeypatch.setattr(bench, "train", lambda cfg: Result)
    monkeypatch.setattr(bench, "read_metrics", lambda run_dir: records)
    s = bench.Setup("small_cnn", 32, 4, 1, bench.torch.device("cpu"), seconds=4.0, warmup=1, workers=0)
    rate = bench.measure_device_pipeline(s, {"labeled": "", "unlabeled": "", "val": ""}, tmp_path, est_step_s=1.0)
    assert rate == 2 / (1 / 100 + 1 / 300)  # 150, not the arithmetic 200
