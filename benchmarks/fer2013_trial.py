"""One FER2013 trial run: the benchmark's ``base_config`` plus JSON overrides (tuning, not the table).

    python benchmarks/fer2013_trial.py NAME ALGORITHM STEPS ['{"ssl": {"soft_mask": true}, "c": {...}, "frac": 0.1}'] \
        [--data ../shared/data] [--out runs/trials] [--fork RUN_DIR] [--stop-after N]

``--fork RUN_DIR`` starts the trial from RUN_DIR's last checkpoint instead of step 0 (a stage-0
checkpoint every trial with the same stage-0 config shares: its steps would compute the same).
RUN_DIR's checkpoints, split, holdout and metrics up to that step are copied; the trial's
config replaces RUN_DIR's, which is left untouched.

``c`` overrides the cpu config's entries (e.g. ``{"eval_every": 500}``), ``frac`` the labeled
fraction (0.0 = all labels), every other key a config section. Writes OUT/NAME/ (the run) and
OUT/NAME.json (the benchmark's row). docs/benchmarks.md lists the trials run with it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fer2013_ssl as bench  # noqa: E402

from semifer.config import load_config, to_dict  # noqa: E402
from semifer.engine import train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name")
    ap.add_argument("algorithm")
    ap.add_argument("steps", type=int)
    ap.add_argument("overrides", nargs="?", default="{}")
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--out", type=Path, default=Path("runs/trials"))
    ap.add_argument("--fork", type=Path, help="resume from a copy of this run directory's last checkpoint")
    ap.add_argument("--stop-after", type=int, help="stop after this many steps (a resumable run: e.g. a stage-0 checkpoint to fork)")
    a = ap.parse_args()
    over = json.loads(a.overrides)
    c = {**bench.CONFIGS["cpu"], **over.pop("c", {})}
    frac = over.pop("frac", 0.1)
    faces = f"images:{a.data / 'unlabeled_faces'}"
    d = to_dict(bench.base_config(c, a.data, a.out / a.name, a.algorithm, a.steps, frac, [faces]))
    for section, values in over.items():
        d[section].update(values)
    cfg = load_config(base=d)
    cfg.run.progress = False
    if a.fork:
        fork(a.fork, Path(cfg.run.out), cfg)
    if a.stop_after is not None:
        res = train(cfg, stop_after=a.stop_after)
        print(f"stopped after {a.stop_after} steps: {res.run_dir}")
        return
    row = bench.scores(train(cfg))
    (a.out / f"{a.name}.json").write_text(json.dumps({"name": a.name, "overrides": a.overrides, **row}, indent=1))
    print(json.dumps({"name": a.name, **{k: v for k, v in row.items() if k != "per_class_f1"}}))


def fork(src: Path, dst: Path, cfg) -> None:
    """Copy run ``src`` (checkpoints, split files, metrics up to its last checkpoint's step) to a
    new run directory ``dst`` that carries ``cfg``; refuses an existing ``dst``."""
    import shutil

    import torch

    from semifer.config import save_config

    if dst.exists():
        raise SystemExit(f"{dst} exists; --fork only starts new trials")
    step = int(torch.load(src / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["step"])
    dst.mkdir(parents=True)
    shutil.copytree(src / "checkpoints", dst / "checkpoints")
    for name in ("split.json", "holdout.json"):
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    lines = (src / "metrics.jsonl").read_text().splitlines()
    (dst / "metrics.jsonl").write_text("".join(l + "\n" for l in lines if json.loads(l).get("step", 0) <= step))
    save_config(cfg, dst / "config.yaml")
    print(f"forked {src} at step {step} -> {dst}")


if __name__ == "__main__":
    main()
