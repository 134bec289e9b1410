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
    if a.test:
        overrides.append(f"data.test={a.test}")
    if a.threads:
        overrides.append(f"run.threads={a.threads}")
    if a.pretrained:
        overrides.append(f"model.pretrained={json.dumps(a.pretrained)}")  # quoted: a path stays a string
    cfg = load_config(a.config, overrides)
    res = train(cfg, stop_after=a.stop_after)
    state = "finished" if res.completed else f"stopped at step {res.steps} (run again to resume)"
    print(f"{cfg.ssl.algorithm}: {state}; best macro-F1 {res.macro_f1:.4f} (accuracy {res.accuracy:.4f}) "
          f"at step {res.best_step}; run dir {res.run_dir}")
    return 0


def _cmd_pretrain(a: argparse.Namespace) -> int:
    import shlex

    import yaml

    from semifer.config import load_config
    from semifer.ssl.pretrain import pretrain

    cfg = load_config(a.config, list(a.set or []))
    res = pretrain(cfg, Path(a.out), a.steps, batch_size=a.batch_size, temperature=a.temperature,
                   stop_after=a.stop_after)
    if not res["completed"]:
        print(f"pretrain: stopped at step {res['steps']} of {a.steps} (run again to resume); "
              f"loss {res['loss']:.4f}; checkpoint {res['checkpoint']}")
        return 0
    ki, kp = res["knn_init"], res["knn_pretrained"]
    print(f"pretrain: {res['steps']} steps on {res['images']} images in {res['wall_s']:.0f} s; final loss "
          f"{res['loss']:.4f}")
    print(f"k-NN (k={kp['k']}) on the val set: accuracy {ki['accuracy']:.4f} -> {kp['accuracy']:.4f}, "
          f"macro-F1 {ki['macro_f1']:.4f} -> {kp['macro_f1']:.4f} (initial -> pretrained backbone)")
    print(f"wrote {res['path']}; train from it with:")
    path = res["path"]
    if yaml.safe_load(path) != path:  # e.g. a path YAML would read as a number: quote it
        path = json.dumps(path)
    print(f"  semifer train ... --set {shlex.quote('model.pretrained=' + path)}")
    return 0


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from semifer.eval.report import evaluate_path, format_scores

    from semifer.bundled import resolve_model

    if a.path and a.model:
        raise ValueError("evaluate takes PATH or --model, not both")
    scores = evaluate_path(resolve_model(a.path or a.model), data=a.data, device=a.device)
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

    run_demo(Path(a.out), algorithms=a.algorithms.split(","), steps=a.steps, threads=a.threads or 0)
    return 0


def _cmd_config(a: argparse.Namespace) -> int:
    import yaml

    from semifer.config import load_config, to_dict

    print(yaml.safe_dump(to_dict(load_config(a.config, list(a.set or []))), sort_keys=False), end="")
    return 0


def _detector_options(a: argparse.Namespace) -> dict:
    """--detector-model / --det-threshold / --detector-opt KEY=VALUE -> detector keyword arguments."""
    opts: dict = {}
    for item in a.detector_opt or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--detector-opt wants KEY=VALUE, got {item!r}")
        try:
            opts[key] = json.loads(value)
        except json.JSONDecodeError:
            opts[key] = value
    if a.detector_model:
        opts["model"] = a.detector_model
    if a.det_threshold is not None:
        opts["threshold"] = a.det_threshold
    return opts


def _add_detector_args(p: argparse.ArgumentParser, default: str = "auto") -> None:
    p.add_argument("--detector", default=default, help="registered face detector (semifer detectors); auto = "
                   "mtcnn where facenet-pytorch is installed, else dlib")
    p.add_argument("--detector-model", help="model file of an ONNX detector (e.g. SCRFD det_10g.onnx)")
    p.add_argument("--det-threshold", type=float, help="detector score threshold")
    p.add_argument("--detector-opt", action="append", metavar="KEY=VALUE", help="other detector option, e.g. upsample=0")
    p.add_argument("--every", type=int, default=1, help="use every N-th video frame")
    p.add_argument("--max-frames", type=int, help="stop each video/camera after this many frames")


def _cmd_prepare(a: argparse.Namespace) -> int:
    from semifer.faces.prepare import prepare

    rep = prepare(a.inputs, a.out, detector=a.detector, detector_options=_detector_options(a), workers=a.workers,
                  every=a.every, ext=a.format, size=a.size, max_frames=a.max_frames, progress=not a.quiet,
                  frame=a.frame)
    print(rep.summary())
    return 0


def _cmd_predict(a: argparse.Namespace) -> int:
    from semifer.infer import Predictor
    from semifer.infer.run import merge_predictions, predict_media
    from semifer.infer.shards import device_for, pick_shard

    if a.merge:
        if a.checkpoint or a.inputs or a.shard:
            raise ValueError("--merge OUT takes no checkpoint, inputs or --shard")
        rep = merge_predictions(a.merge, abaw=a.abaw, fill=a.fill)
    else:
        from semifer.bundled import looks_like_model

        model, inputs = a.model, list(a.inputs)
        if a.checkpoint and (model is not None or not looks_like_model(a.checkpoint)):
            inputs.insert(0, a.checkpoint)   # `semifer predict photo.jpg`: the bundled model
        elif a.checkpoint:
            model = a.checkpoint
        if not inputs or not a.out:
            raise ValueError("predict needs at least one INPUT and --out (or --merge OUT)")
        shard = pick_shard(a.shard)
        pred = Predictor(model, detector=a.detector, detector_options=_detector_options(a),
                         device=device_for(a.device, shard), batch_size=a.batch_size, detect_every=a.detect_every,
                         rotations=tuple(float(v) for v in a.rotations.split(",")) if a.rotations not in ("", "none") else (),
                         fallback_detector=None if a.fallback_detector in ("", "none") else a.fallback_detector)
        if not a.quiet:
            print(f"semifer: model {pred.model_path}")
        rep = predict_media(pred, inputs, a.out, every=a.every, smooth=a.smooth, annotate=a.annotate,
                            max_frames=a.max_frames, abaw=a.abaw, fill=a.fill, progress=not a.quiet, shard=shard)
        if shard.count > 1 and not shard.launched:
            if a.abaw:
                print("ABAW files are written by the merge: semifer predict --merge OUT --abaw ...")
            print(f"shard {shard} done; when all {shard.count} are: semifer predict --merge {a.out}")
    if rep.skips.total and rep.frames == 0 and not rep.reused:
        # Nothing usable at all: the reasons first, and a failing exit status for scripts.
        print(f"semifer predict: no input could be read ({rep.skips.total} skipped):", file=sys.stderr)
        for reason, n in rep.skips.counts.most_common():
            print(f"  {n} x {reason}: {', '.join(rep.skips.examples.get(reason, []))}", file=sys.stderr)
        print(rep.summary(), file=sys.stderr)
        return 1
    if not a.quiet:
        _print_faces(rep.csv)
    print(rep.summary())
    if rep.skips.total:
        print(f"skipped {rep.skips.total} input(s): {rep.skips.summary()}")
    for f in rep.abaw_files:
        print(f"ABAW: {f}")
    return 0


def _print_faces(csv_path, limit: int = 20) -> None:
    """One line per face (label, its probability, box) when the CSV is short enough to read:
    `semifer predict photo.jpg` answers on the console; videos and folders stay in the CSV."""
    import csv

    # display only: undecodable bytes in file names (kept exactly in the CSV) are shown replaced
    with open(csv_path, newline="", encoding="utf-8", errors="replace") as f:
        rows = list(csv.DictReader(f))
    if not rows or len(rows) > limit:
        return
    for r in rows:
        where = r["source"] + (f" frame {r['frame']}" if r["frame"] not in ("", "0") else "")
        if r["label"] == "none":
            print(f"  {where}: no face found")
        else:
            box = ",".join(str(round(float(r[k]))) for k in ("x1", "y1", "x2", "y2"))
            print(f"  {where} face {r['face']}: {r['label']} {float(r[r['label']]):.2f}  (box {box})")


def _add_shard_args(p: argparse.ArgumentParser, cmd: str) -> None:
    p.add_argument("--shard", metavar="I/N", help="this job's share of the inputs (0 <= I < N), written to "
                   "OUT/shards/; under torchrun the shard is the rank (docs/distributed.md)")
    p.add_argument("--merge", metavar="OUT", help=f"merge OUT/shards/ into the {cmd} file once every shard is there")


def _cmd_pseudolabel(a: argparse.Namespace) -> int:
    from semifer.infer.pseudolabel import merge_pseudolabels, pseudolabel
    from semifer.infer.shards import device_for, pick_shard

    if a.merge:
        if a.checkpoint or a.unlabeled or a.shard:
            raise ValueError("--merge OUT takes no --checkpoint, --unlabeled or --shard")
        rep = merge_pseudolabels(a.merge)
    else:
        if not a.checkpoint or not a.unlabeled or not a.out:
            raise ValueError("pseudolabel needs --checkpoint, at least one --unlabeled and --out (or --merge OUT)")
        shard = pick_shard(a.shard)
        rep = pseudolabel(a.checkpoint, a.unlabeled, a.out, batch_size=a.batch_size, threshold=a.threshold,
                          device=device_for(a.device, shard), workers=a.workers, shard=shard, progress=not a.quiet)
        if shard.count > 1 and not shard.launched:
            print(f"shard {shard} done; when all {shard.count} are: semifer pseudolabel --merge {a.out}")
    print(rep.summary())
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    from semifer.infer.onnx_export import export_onnx

    from semifer.bundled import resolve_model

    if a.checkpoint and a.model:
        raise ValueError("export takes CHECKPOINT or --model, not both")
    print(f"wrote {export_onnx(resolve_model(a.checkpoint or a.model), a.onnx, opset=a.opset)}")
    return 0


def _cmd_models(a: argparse.Namespace) -> int:
    from semifer.bundled import DEFAULT_MODEL, available, card

    names = available()
    if not names:
        print("this install has no bundled model (semifer predict then needs a run directory, checkpoint or .onnx)")
        return 0
    for name in names:
        c = card(name)
        scores = c.get("scores", {})
        shown = ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if isinstance(v, float))
        mark = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name}{mark}: {c['backbone']} {c['input']}, face frame {c['face_frame']}, "
              f"{c['bytes'] / 1e6:.1f} MB; trained on {c.get('trained_on', '?')}")
        if shown:
            print(f"    {c.get('scored_on', 'scores')}: {shown}")
    return 0


def _cmd_serve(a: argparse.Namespace) -> int:
    try:
        from semifer.serve import create_app, serve
    except ImportError as e:
        raise ImportError(f"semifer serve needs the serve extra ({e}): pip install 'semifer[serve]'") from None
    from semifer.engine.threads import apply_threads

    if a.checkpoint and a.model:
        raise ValueError("serve takes MODEL or --model, not both")
    apply_threads(a.threads or 0)
    app = create_app(a.checkpoint or a.model, runs=a.runs, detector=a.detector, detector_options=_detector_options(a),
                     detect_every=a.detect_every, max_upload_mb=a.max_upload_mb)
    info = app.state.photos.predictor
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"semifer serve: listening on {a.host}: anyone who can reach this machine can upload files "
              "and read the runs", file=sys.stderr)
    print(f"semifer serve: http://{a.host}:{a.port}/  (model {info.model_path}, detector {info.detector_name}, "
          f"runs {app.state.runs.root or 'none'}; Ctrl-C stops)", flush=True)
    serve(app, a.host, a.port)
    return 0


def _cmd_abaw(a: argparse.Namespace) -> int:
    from semifer.infer.run import write_abaw_from_csv

    counts = None
    if a.frame_counts:
        import csv

        with open(a.frame_counts, newline="") as f:
            counts = {row[0]: int(row[1]) for row in csv.reader(f) if row and row[1].strip().isdigit()}
    for path in write_abaw_from_csv(a.predictions, a.out, layout=a.layout, fill=a.fill, frame_counts=counts):
        print(f"wrote {path}")
    return 0


def _cmd_list(kind: str):
    def run(a: argparse.Namespace) -> int:
        import semifer  # noqa: F401  (fills the registries)
        from semifer import registry

        reg = {"algorithms": registry.ALGORITHMS, "formats": registry.FORMATS, "detectors": registry.DETECTORS,
               "thresholds": registry.THRESHOLDS}.get(kind)
        if kind == "backbones":
            from semifer.models.backbones import describe_backbones
            for name, n, doc in describe_backbones():
                count = f"{n / 1e6:7.2f}M params" if n is not None else " " * 14
                print(f"{name:<14} {count}  {doc}")
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
    from semifer import __version__

    p = argparse.ArgumentParser(prog="semifer", description="Semi-supervised facial-expression recognition.")
    p.add_argument("--version", action="version", version=f"semifer {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train or resume a run", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       epilog="Every config key (data.*, model.*, ssl.*, optim.*, run.*) with its default: "
                              "`semifer config` (add --config F / --set K=V to see them resolved). Without --labeled the run uses "
                              "the embedded synthetic demo faces; with it, nothing synthetic is mixed in and, "
                              "without --val, 10%% of the labeled set is held out for checkpoint selection.")
    t.add_argument("--config", help="YAML config (see configs/)")
    t.add_argument("--algorithm", help="registered algorithm (semifer algorithms)")
    t.add_argument("--out", help="run directory (resumed if it exists)")
    t.add_argument("--steps", type=int, help="total training steps")
    t.add_argument("--labeled", help="FORMAT:PATH of the labeled set")
    t.add_argument("--unlabeled", action="append", help="FORMAT:PATH of an unlabeled source (repeatable)")
    t.add_argument("--val", help="FORMAT:PATH of the validation set (default: data.val_fraction of --labeled)")
    t.add_argument("--test", help="FORMAT:PATH scored once at the end with the checkpoint chosen on val")
    t.add_argument("--threads", type=int, help="CPU threads (default: the allowed CPUs not busy with other work)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. ssl.tau=0.9")
    t.add_argument("--stop-after", type=int, help="stop this invocation after N steps (resume later)")
    t.add_argument("--pretrained", metavar="PATH",
                   help="backbone weights: .pth/.pt/.safetensors state dict, dlib .dat, or dlib-fr (docs/backbones.md)")
    t.set_defaults(func=_cmd_train)

    ptr = sub.add_parser("pretrain", help="self-supervised (SimCLR) pretraining of the backbone on the unlabeled faces")
    ptr.add_argument("--config", help="YAML config (the same as the later semifer train run's)")
    ptr.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. data.image_size=48")
    ptr.add_argument("--out", required=True, help="output folder (resumed if it holds pretrain_last.pt)")
    ptr.add_argument("--steps", type=int, required=True, help="total pretraining steps")
    ptr.add_argument("--batch-size", type=int, default=128, help="faces per step (2 views each)")
    ptr.add_argument("--temperature", type=float, default=0.2, help="NT-Xent temperature")
    ptr.add_argument("--stop-after", type=int, help="stop this invocation after N steps (resume later)")
    ptr.set_defaults(func=_cmd_pretrain)

    e = sub.add_parser("evaluate", help="re-score a saved model")
    e.add_argument("path", nargs="?", help="run directory or checkpoint file")
    e.add_argument("--model", help="a bundled model's name (semifer models); neither: the default bundled model")
    e.add_argument("--data", help="FORMAT:PATH to score on (default: the run's val set)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--out", help="folder for scores.json and confusion.png")
    e.set_defaults(func=_cmd_evaluate)

    d = sub.add_parser("demo", help="train supervised vs SSL on the embedded synthetic faces")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--algorithms", default="supervised,dtm", help="comma-separated; add fixmatch etc. (README gives "
                   "measured times: 2-8 min each on 2 CPU cores)")
    d.add_argument("--steps", type=int, default=None, help="override the demo's step count")
    d.add_argument("--threads", type=int, help="CPU threads (default: the allowed CPUs not busy with other work)")

    cf = sub.add_parser("config", help="print every config key with its default (or resolved with --config/--set)")
    cf.add_argument("--config", help="YAML config to resolve")
    cf.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override")
    cf.set_defaults(func=_cmd_config)
    d.set_defaults(func=_cmd_demo)

    pr = sub.add_parser("prepare", help="detect, align and crop faces of images, folders and videos")
    pr.add_argument("inputs", nargs="+", metavar="INPUT", help="image, folder or video file")
    pr.add_argument("--out", required=True, help="output folder (re-running resumes)")
    _add_detector_args(pr, default="dlib")  # prepared folders record their detector: dlib stays, so they resume
    pr.add_argument("--workers", type=int, default=2, help="worker processes (one source each)")
    pr.add_argument("--format", default="jpg", choices=["jpg", "png"], help="crop file format")
    pr.add_argument("--size", type=int, default=112, help="crop size (the face frame is scaled)")
    pr.add_argument("--frame", default="arcface112",
                    help="face frame of the crops: arcface112 (ArcFace alignment) or fer2013 (FER2013's tighter crops)")
    pr.add_argument("--quiet", action="store_true")
    pr.set_defaults(func=_cmd_prepare)

    pp = sub.add_parser("predict", help="expressions of every face in images, folders, videos or cam:N")
    pp.add_argument("checkpoint", nargs="?", metavar="MODEL",
                    help="run directory, checkpoint file, exported .onnx or bundled model name; "
                         "left out: the bundled model (semifer models)")
    pp.add_argument("inputs", nargs="*", metavar="INPUT", help="image, folder, video file or cam:N")
    pp.add_argument("--out", default="predictions", help="folder for predictions.csv (and annotated/, abaw/)")
    pp.add_argument("--model", help="same as MODEL (a path or bundled model name)")
    _add_shard_args(pp, "predict")
    pp.add_argument("--rotations", metavar="DEG,DEG,...", default="30,-30,60,-60",
                    help="where a photo shows no face, look again on copies turned by these angles "
                         "(tilted heads; default 30,-30,60,-60; none = off)")
    pp.add_argument("--fallback-detector", metavar="NAME", default="dlib_cnn",
                    help="where a photo shows no face (after --rotations), try this detector too "
                         "(default dlib_cnn, about 3 s a photo; none = off)")
    pp.add_argument("--detect-every", type=int, default=5, metavar="N",
                    help="video: run the face detector every N frames and re-fit the faces in between "
                         "(detectors that can, e.g. mtcnn; 1 = detect every frame)")
    _add_detector_args(pp)
    pp.add_argument("--batch-size", type=int, default=64, help="faces per classifier batch")
    pp.add_argument("--smooth", type=float, default=0.0, help="video: exponential smoothing alpha in [0, 1)")
    pp.add_argument("--annotate", action="store_true", help="write annotated images/videos to OUT/annotated/")
    pp.add_argument("--abaw", choices=["txt", "single"], help="also write ABAW files (per-video .txt or one file)")
    pp.add_argument("--fill", default="nearest", choices=["nearest", "previous", "neutral"],
                    help="ABAW label for frames without a face")
    pp.add_argument("--device", default="cpu")
    pp.add_argument("--quiet", action="store_true")
    pp.set_defaults(func=_cmd_predict)

    pl = sub.add_parser("pseudolabel", help="class probabilities, label and confidence for unlabeled face crops")
    pl.add_argument("--checkpoint", help="run directory or checkpoint file (EMA weights where it has them)")
    pl.add_argument("--unlabeled", action="append", metavar="FORMAT:PATH",
                    help="folder:, list:, wds:, recordio: (or an in-memory format such as npz:); repeatable")
    pl.add_argument("--out", help="folder for pseudolabels.csv and pseudolabels.json")
    pl.add_argument("--batch-size", type=int, default=256)
    pl.add_argument("--threshold", help="keep rows with confidence >= this: a number, or dtm for the class-wise "
                    "thresholds of the checkpoint's algorithm state")
    pl.add_argument("--workers", type=int, default=2, help="decoding threads")
    pl.add_argument("--device", default="cpu")
    pl.add_argument("--quiet", action="store_true")
    _add_shard_args(pl, "pseudolabels")
    pl.set_defaults(func=_cmd_pseudolabel)

    ex = sub.add_parser("export", help="export a checkpoint to ONNX")
    ex.add_argument("checkpoint", nargs="?", help="run directory (best checkpoint) or checkpoint file")
    ex.add_argument("--model", help="a bundled model's name (semifer models); neither: the default bundled model")
    ex.add_argument("--onnx", required=True, help="output .onnx file")
    ex.add_argument("--opset", type=int, default=18)
    ex.set_defaults(func=_cmd_export)

    sv = sub.add_parser("serve", help="local web app: photos, video, webcam and a dashboard of training runs",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sv.add_argument("checkpoint", nargs="?", metavar="MODEL",
                    help="run directory, checkpoint file, exported .onnx or bundled model name; left out: the "
                         "bundled model")
    sv.add_argument("--model", help="same as MODEL")
    sv.add_argument("--runs", default="runs", help="folder searched for run directories (the dashboard)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes it to the network)")
    sv.add_argument("--port", type=int, default=7860, help="port to listen on")
    sv.add_argument("--max-upload-mb", type=float, default=50.0, help="largest request (photos or one video)")
    sv.add_argument("--detector", default="auto", help="registered face detector (semifer detectors)")
    sv.add_argument("--detector-model", help="model file of an ONNX detector")
    sv.add_argument("--det-threshold", type=float, help="detector score threshold")
    sv.add_argument("--detector-opt", action="append", metavar="KEY=VALUE", help="other detector option")
    sv.add_argument("--detect-every", type=int, default=5, metavar="N", help="video: full detection every N frames")
    sv.add_argument("--threads", type=int, help="CPU threads; left out: the allowed CPUs not busy with other work")
    sv.set_defaults(func=_cmd_serve)

    ab = sub.add_parser("abaw", help="ABAW challenge files from a predictions.csv")
    ab.add_argument("predictions", help="predictions.csv written by semifer predict")
    ab.add_argument("--out", required=True, help="folder for abaw/*.txt or abaw_predictions.txt")
    ab.add_argument("--layout", default="txt", choices=["txt", "single"])
    ab.add_argument("--fill", default="nearest", choices=["nearest", "previous", "neutral"])
    ab.add_argument("--frame-counts", help="CSV of VIDEO,FRAMES (default: decode each video to count)")
    ab.set_defaults(func=_cmd_abaw)

    sub.add_parser("models", help="list the expression models bundled with semifer").set_defaults(func=_cmd_models)
    for kind in ("algorithms", "backbones", "formats", "thresholds", "detectors"):
        sub.add_parser(kind, help=f"list registered {kind}").set_defaults(func=_cmd_list(kind))
    return p


def main(argv: list[str] | None = None) -> int:
    from semifer.engine.rundir import RunDirConflict

    args = build_parser().parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # a non-UTF-8 file name in a message must not stop a run
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, ImportError, RunDirConflict) as e:
        print(f"semifer: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
