"""Run directories: created once, never deleted, resumed only with the same config."""
from __future__ import annotations

from pathlib import Path

import yaml

from semifer.config import TrainConfig, merge, save_config, to_dict

CONFIG_FILE = "config.yaml"
# Settings that may change between a run and its resumption without changing results.
# Keys that do not change what training computes: a run resumes with them changed.
# data.face_frame only describes the crops, for predict and export; model.mirror_average changes
# what evaluation scores, not what a training step computes.
_RESUME_FREE = {("run", "progress"), ("run", "device"), ("run", "eval_batch_size"), ("run", "threads"),
                ("data", "face_frame"), ("model", "mirror_average")}


class RunDirConflict(RuntimeError):
    """The run directory belongs to a run with a different configuration."""


def _diff(a: dict, b: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for k in sorted(set(a) | set(b)):
        path = (*prefix, k)
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict) and k != "backbone_args":
            out += _diff(va, vb, path)
        elif va != vb:
            out.append((path, va, vb))
    return out


def prepare_run_dir(cfg: TrainConfig, write: bool = True) -> Path:
    """Create ``cfg.run.out`` with the resolved config, or check that an existing one matches.

    An existing directory with a different config is refused (never overwritten): the
    message lists the differing keys. The exception is a run that never saved a checkpoint
    (e.g. a command that failed on bad data): nothing of it can be resumed, so a corrected
    command may take the directory over; its config is kept as ``config.yaml.prev``.
    """
    run_dir = Path(cfg.run.out)
    cfg_path = run_dir / CONFIG_FILE
    new = to_dict(cfg)
    if cfg_path.exists():
        # Keys added to the config schema after the run started take their defaults, which
        # by rule reproduce the old behaviour, so such a run still resumes.
        old = merge(to_dict(TrainConfig()), yaml.safe_load(cfg_path.read_text()) or {})
        diffs = [d for d in _diff(old, new) if d[0] not in _RESUME_FREE]
        if diffs and write and not (run_dir / "checkpoints" / "last.pt").exists():
            cfg_path.replace(run_dir / (CONFIG_FILE + ".prev"))
            save_config(cfg, cfg_path)
            print(f"semifer: {run_dir} held a run that never saved a checkpoint; starting it over with the new "
                  f"config (the old one is in {CONFIG_FILE}.prev)")
            return run_dir
        if diffs:
            lines = "; ".join(f"{'.'.join(p)}: {a!r} -> {b!r}" for p, a, b in diffs[:10])
            raise RunDirConflict(f"{run_dir} holds a run with a different config ({lines}); "
                                 "choose another output directory (nothing was changed)")
    elif write:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, cfg_path)
    return run_dir
