"""The ``semifer`` command: argument parsing only; every action calls the Python API."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_train(a: argparse.Namespace) -> int:
    from semifer.config import load_config
    from semifer.engine import train

    overrides = list(a.set or [])
    if a.algorithm:
        overrides.append(f"ssl.algorithm={a.algorithm}")
    if a.out:
        overrides.append(f"run.out={a.out}")
    if a.steps is not None:
        overrides.append(f"optim.steps={a.steps}")
    if a.labeled:
        overrides.append(f"data.labeled={a.labeled}")
    if a.unlabeled:
        overrides.append(f"data.unlabeled={json.dumps(a.unlabeled)}")
    if a.val:
        overrides.append(f"data.val={a.val}")
    cfg = load_config(a.config, overrides)
    res = train(cfg, stop_after=a.stop_after)
    state = "finished" if res.completed else f"stopped at step {res.steps} (run again to resume)"
    print(f"{cfg.ssl.algorithm}: {state}; best macro-F1 {res.macro_f1:.4f} (accuracy {res.accuracy:.4f}) "
          f"at step {res.best_step}; run dir {res.run_dir}")
    return 0


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from semifer.eval.report import evaluate_path, format_scores

    scores = evaluate_path(a.path, data=a.data, device=a.device)
    print(f"{scores['checkpoint']} (step {scores['step']}) on {scores['data']}")
    print(format_scores(scores))
    if a.out:
        from semifer.engine.plots import plot_confusion

        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "scores.json").write_text(json.dumps(scores, indent=2))
        plot_confusion(scores["confusion"], out / "confusion.png", title=f"{scores['data']}")
        print(f"wrote {out / 'scores.json'} and {out / 'confusion.png'}")
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from semifer.demo import run_demo

    run_demo(Path(a.out), algorithms=a.algorithms.split(","), steps=a.steps)
    return 0


def _cmd_list(kind: str):
    def run(a: argparse.Namespace) -> int:
        import semifer  # noqa: F401  (fills the registries)
        from semifer import registry

        reg = {"algorithms": registry.ALGORITHMS, "formats": registry.FORMATS,
               "thresholds": registry.THRESHOLDS}.get(kind)
        if kind == "backbones":
            from semifer.models.backbones import describe_backbones
            for name, n, doc in describe_backbones():
                print(f"{name:<14} {n / 1e6:7.2f}M params  {doc}")
            return 0
        for name, obj in reg.items():
            doc = (obj.__doc__ or "").strip().splitlines()
            print(f"{name:<14} {doc[0] if doc else ''}")
        if kind == "formats":
            print("\nstreamed unlabeled sources (--unlabeled stream:KIND:PATH; wds/recordio/list need no prefix):")
            for name, obj in registry.UNLABELED_SOURCES.items():
                doc = (obj.__doc__ or "").strip().splitlines()
                print(f"{name:<14} {doc[0] if doc else ''}")
        return 0
    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="semifer", description="Semi-supervised facial-expression recognition.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train or resume a run")
    t.add_argument("--config", help="YAML config (see configs/)")
    t.add_argument("--algorithm", help="registered algorithm (semifer algorithms)")
    t.add_argument("--out", help="run directory (resumed if it exists)")
    t.add_argument("--steps", type=int, help="total training steps")
    t.add_argument("--labeled", help="FORMAT:PATH of the labeled set")
    t.add_argument("--unlabeled", action="append", help="FORMAT:PATH of an unlabeled source (repeatable)")
    t.add_argument("--val", help="FORMAT:PATH of the validation set")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. ssl.tau=0.9")
    t.add_argument("--stop-after", type=int, help="stop this invocation after N steps (resume later)")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("evaluate", help="re-score a saved model")
    e.add_argument("path", help="run directory or checkpoint file")
    e.add_argument("--data", help="FORMAT:PATH to score on (default: the run's val set)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--out", help="folder for scores.json and confusion.png")
    e.set_defaults(func=_cmd_evaluate)

    d = sub.add_parser("demo", help="train supervised vs SSL on the embedded synthetic faces")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--algorithms", default="supervised,dtm", help="comma-separated; add fixmatch etc. (about 2.5 min each)")
    d.add_argument("--steps", type=int, default=None, help="override the demo's step count")
    d.set_defaults(func=_cmd_demo)

    for kind in ("algorithms", "backbones", "formats", "thresholds"):
        sub.add_parser(kind, help=f"list registered {kind}").set_defaults(func=_cmd_list(kind))
    return p


def main(argv: list[str] | None = None) -> int:
    from semifer.engine.rundir import RunDirConflict

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, RunDirConflict) as e:
        print(f"semifer: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
