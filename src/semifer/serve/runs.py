"""Run directories under ``--runs`` as JSON for the dashboard.

A run is a folder with a ``metrics.jsonl`` (:mod:`semifer.engine.runlog`). Records are read
with :func:`read_metrics` (resumes resolved) and turned into the series the PNG plots of
:mod:`semifer.engine.plots` draw. A run's data is cached by the metrics file's size and
mtime, so a page polling a training run re-reads the file only when it has grown.
"""
from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path

from semifer.engine.plots import _class_series, _series
from semifer.engine.runlog import METRICS_FILE, read_metrics
from semifer.labels import ABAW_LABELS

# folders a run writes that never hold another run (not searched)
_SKIP_DIRS = {"checkpoints", "tensorboard", "plots", "shards", "annotated", "__pycache__"}
MAX_DEPTH = 4          # runs/<experiment>/<trial>/<algorithm>/ is as deep as semifer's own layouts go
MAX_POINTS = 1500      # per train series: a long run is thinned for the page, the last record kept
LIVE_SECONDS = 120     # a run whose metrics grew this recently and that has no results.json is "training"


def _plain(values) -> list:
    """numpy values -> JSON numbers, NaN -> null (JSON has no NaN)."""
    out = []
    for v in values.tolist():
        if isinstance(v, list):
            out.append([None if isinstance(x, float) and math.isnan(x) else x for x in v])
        else:
            out.append(None if isinstance(v, float) and math.isnan(v) else v)
    return out


def _steps(values) -> list[int]:
    return [int(v) for v in values.tolist()]


def _thin(n: int) -> slice | list[int]:
    if n <= MAX_POINTS:
        return slice(None)
    step = math.ceil(n / MAX_POINTS)
    idx = list(range(0, n, step))
    return idx if idx[-1] == n - 1 else idx + [n - 1]


class RunReader:
    """Finds the runs under ``root`` and serves each one's metrics, re-read when the file changes."""

    def __init__(self, root: Path | str | None) -> None:
        self.root = Path(root).resolve() if root else None
        self._cache: dict[Path, tuple[tuple[int, int], dict]] = {}
        self._lock = threading.Lock()

    def find(self) -> list[Path]:
        """Run directories under the root (the root itself when it is one), sorted by name."""
        if self.root is None or not self.root.is_dir():
            return []
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            here = Path(dirpath)
            if METRICS_FILE in filenames:
                found.append(here)
            depth = len(here.relative_to(self.root).parts)
            dirnames[:] = sorted(d for d in dirnames if depth < MAX_DEPTH and not d.startswith(".")
                                 and d not in _SKIP_DIRS)
        return sorted(found)

    def name(self, run: Path) -> str:
        rel = run.relative_to(self.root).as_posix()
        return self.root.name if rel == "." else rel

    def resolve(self, name: str) -> Path:
        """A run's name (as :meth:`listing` gives it) -> its folder; KeyError for anything else."""
        for run in self.find():
            if self.name(run) == name:
                return run
        raise KeyError(f"no run {name!r} under {self.root}")

    def listing(self) -> list[dict]:
        """One summary per run: name, algorithm, progress, best macro-F1, a version to poll."""
        out = []
        for run in self.find():
            try:
                d = self.data(run)
            except OSError:
                continue  # removed while listing
            out.append({k: d[k] for k in ("name", "algorithm", "last_step", "total_steps", "best", "version",
                                          "training", "finished")})
        return out

    def data(self, run: Path) -> dict:
        """Everything the dashboard draws for one run (cached until metrics.jsonl changes)."""
        st = (run / METRICS_FILE).stat()
        key = (st.st_size, st.st_mtime_ns)
        with self._lock:
            hit = self._cache.get(run)
        if hit is not None and hit[0] == key:
            return hit[1]
        d = self._read(run, st.st_mtime)
        d["version"] = f"{key[0]}-{key[1]}"
        with self._lock:
            self._cache[run] = (key, d)
        return d

    def _read(self, run: Path, mtime: float) -> dict:
        import yaml

        records = read_metrics(run)
        config_text, cfg = "", {}
        if (run / "config.yaml").is_file():
            config_text = (run / "config.yaml").read_text(encoding="utf-8", errors="replace")
            try:
                cfg = yaml.safe_load(config_text) or {}
            except yaml.YAMLError:
                cfg = {}
        fstep, f1 = _series(records, "eval", "macro_f1")
        astep, acc = _series(records, "eval", "accuracy")
        evals = {"step": _steps(fstep), "macro_f1": _plain(f1), "acc_step": _steps(astep), "accuracy": _plain(acc)}
        train: dict[str, dict] = {}
        for key in ("loss", "mask_rate", "pseudo_acc"):
            s, v = _series(records, "train", key)
            sel = _thin(len(s))
            if len(s):
                train[key] = {"step": _steps(s[sel]), "value": _plain(v[sel])}
        for key in ("thresholds", "pseudo_class_mix"):
            s, v = _class_series(records, "train", key)
            sel = _thin(len(s))
            if len(s):
                train[key] = {"step": _steps(s[sel]), "value": _plain(v[sel])}
        rounds = [{k: r.get(k) for k in ("step", "round", "thresholds", "accepted_per_class", "accepted_accuracy")}
                  for r in records if r["kind"] == "round"]
        scored = [r for r in records if r["kind"] == "eval" and isinstance(r.get("macro_f1"), (int, float))]
        # the earliest best step, as the plots and the trainer's best.pt choose it
        best = max(scored, key=lambda r: r["macro_f1"]) if scored else None
        with_cm = [r for r in records if r["kind"] == "eval" and isinstance(r.get("confusion"), list)]
        cm = best if best is not None and isinstance(best.get("confusion"), list) else (with_cm[-1] if with_cm else None)
        steps = [r["step"] for r in records if r["kind"] in ("train", "eval")]
        finished = (run / "results.json").is_file()
        return {
            "name": self.name(run),
            "algorithm": (cfg.get("ssl") or {}).get("algorithm", "?") if isinstance(cfg, dict) else "?",
            "total_steps": (cfg.get("optim") or {}).get("steps") if isinstance(cfg, dict) else None,
            "last_step": max(steps) if steps else 0,
            "best": {"macro_f1": best["macro_f1"], "step": best["step"], "accuracy": best.get("accuracy")} if best else None,
            "finished": finished,
            "training": not finished and time.time() - mtime < LIVE_SECONDS,
            "labels": list(ABAW_LABELS),
            "eval": evals,
            "train": train,
            "rounds": rounds,
            "confusion": {"step": cm["step"], "macro_f1": cm.get("macro_f1"), "matrix": cm["confusion"],
                          "per_class_f1": cm.get("per_class_f1")} if cm else None,
            "config": config_text,
        }
