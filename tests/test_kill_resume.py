"""SIGKILL a training process at random points (also inside checkpoint writes), resume, compare.

The checkpoint must always load, and the run that was killed and resumed must end with
exactly the weights, EMA and algorithm state of an uninterrupted run.
"""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from semifer.config import to_dict
from semifer.engine import train
from semifer.engine.checkpoint import load_checkpoint
from semifer.engine.runlog import read_metrics
from tests.conftest import tiny_config

pytestmark = pytest.mark.faults
ROOT = Path(__file__).resolve().parents[1]


def _start(cfg_path: Path, marker: Path | None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("SEMIFER_TEST_SAVE_MARKER", None)
    if marker is not None:
        env["SEMIFER_TEST_SAVE_MARKER"] = str(marker)
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "kill_worker.py"), str(cfg_path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise TimeoutError(f"{path} never appeared")


def test_sigkill_anywhere_then_resume_equals_an_uninterrupted_run(tiny_data, tmp_path):
    torch.set_num_threads(1)
    sections = {"optim": {"batch_size": 16, "steps": 24, "lr": 0.05},
                "run": {"log_every": 2, "eval_every": 4, "checkpoint_every": 2, "progress": False,
                        # the workers run with one thread; so must the reference (results depend on it)
                        "threads": 1}}
    ref = train(tiny_config(tiny_data, tmp_path / "ref", steps=24, **sections))
    cfg = tiny_config(tiny_data, tmp_path / "killed", steps=24, **sections)
    cfg_path = tmp_path / "killed.yaml"
    cfg_path.write_text(yaml.safe_dump(to_dict(cfg)))
    last = tmp_path / "killed" / "checkpoints" / "last.pt"
    marker = tmp_path / "saving"
    rng = random.Random(7)
    kills, kills_mid_write, finished = 0, 0, False
    for cycle in range(8):
        in_write = cycle % 2 == 0          # alternate: inside a checkpoint write / at a random moment
        marker.unlink(missing_ok=True)
        proc = _start(cfg_path, marker if in_write else None)
        if in_write:
            started = _wait_for(marker, proc)
            time.sleep(rng.uniform(0.0, 0.5))
        else:
            started = True
            time.sleep(rng.uniform(0.5, 6.0))
        if not started or proc.poll() is not None:
            assert proc.wait() == 0, proc.stderr.read().decode()
            finished = True
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        tmp_files = list(last.parent.glob(".*.tmp")) if last.parent.exists() else []
        kills_mid_write += bool(tmp_files)
        if last.exists():                  # whatever moment the kill hit, the checkpoint loads
            assert load_checkpoint(last)["step"] % 2 == 0
    if not finished:
        proc = _start(cfg_path, None)
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    assert kills >= 3 and kills_mid_write >= 1, (kills, kills_mid_write)
    assert not list(last.parent.glob(".*.tmp"))          # stale partial writes were cleared on resume
    a = load_checkpoint(ref.run_dir / "checkpoints" / "last.pt")
    b = load_checkpoint(last)
    assert b["step"] == a["step"] == 24
    for key in ("model", "ema", "algorithm"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after kill/resume"
    evals = [r["step"] for r in read_metrics(tmp_path / "killed") if r.get("kind") == "eval"]
    assert evals == sorted(set(evals)) and evals[-1] == 24     # no duplicated or lost evaluations
