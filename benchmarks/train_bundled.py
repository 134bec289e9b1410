"""Train (or resume) the bundled expression model and pack it into the package, with its card.

    python benchmarks/train_bundled.py [--config configs/bundled_fer2013.yaml] [--name fer2013-cnn24]
        [--stop-after N] [--threads N] [--pack-only]
    python benchmarks/train_bundled.py --config CONFIG --name NAME --ensemble MEMBER [MEMBER ...] [--pasted FACES.npz]

With ``--ensemble`` nothing is trained: the members (bundled names, run dirs or checkpoints,
each trained to the end) become one model whose logits are their weighted mean
(``semifer.bundled.ensemble_checkpoint``); the weights are chosen with the inference settings
below, on the held-out split of CONFIG's run, which every member must have held out too.

1. ``semifer train --config CONFIG`` (resumes the run directory; ``--stop-after`` splits it
   across sessions). The run scores fer2013/val once, with the checkpoint chosen on its own
   held-out 5 % of train.
2. Chooses mirror averaging (on/off) and a post-hoc logit adjustment ``logits - tau * log(train prior)`` for macro-F1 on the
   run's own held-out 5 % of train (``semifer.bundled.prior_adjustment``; fer2013/val plays no
   part) and folds it into the head's bias.
3. Scores the packed model on the config's test set: accuracy, macro-F1 over the 7 classes
   FER2013 has and over ABAW's 8, per-class F1, and the confusion matrix
   (``docs/results/bundled_<name>_confusion.png``, ``docs/results/bundled_<name>.json``), and the
   unadjusted checkpoint's scores beside them.

``--pasted FACES.npz`` makes step 2 also score the held-out split *as predict sees it*: each
held-out face pasted into a photo, found by the detector and cropped by predict's path
(``benchmarks/pasted_faces.py --split RUN/split.json --cache FACES.npz`` detects them once; a face
not found counts as wrong). The choice then maximises the mean of the two views' macro-F1 (7):
FER2013's own framing, which the model card scores, and new photos, which users predict.
4. Packs the weights + config + card into ``src/semifer/bundled/<name>.pt`` (``semifer models``);
   ``--weights int8`` stores the conv and linear weights as int8 with per-channel scales (a quarter
   of float32; the default float16 is half).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "bundled_fer2013.yaml")
    ap.add_argument("--name", default="fer2013-cnn24")
    ap.add_argument("--stop-after", type=int)
    ap.add_argument("--threads", type=int, help="torch threads (run.threads; changing it on resume is allowed)")
    ap.add_argument("--pack-only", action="store_true", help="skip training (the run must have finished)")
    ap.add_argument("--pasted", type=Path, metavar="FACES.npz",
                    help="also choose on the held-out faces pasted into photos, as predict crops them (see above)")
    ap.add_argument("--ensemble", nargs="+", metavar="MEMBER",
                    help="pack these finished models as one ensemble (no training); CONFIG's run gives the held-out split")
    ap.add_argument("--weights", choices=("float32", "float16", "int8"), default="float16",
                    help="how the packed file stores the large weight tensors (semifer.bundled.storage_state)")
    a = ap.parse_args()
    import numpy as np

    from semifer.bundled import ensemble_checkpoint, pack, resolve_model
    from semifer.config import load_config
    from semifer.engine import train
    from semifer.engine.checkpoint import load_checkpoint
    from semifer.engine.plots import plot_confusion
    from semifer.eval.report import evaluate_path
    from semifer.labels import ABAW_LABELS

    a.config = a.config.resolve()
    shown = a.config.relative_to(ROOT) if a.config.is_relative_to(ROOT) else a.config
    cfg = load_config(a.config, overrides=["run.progress=false"] + ([f"run.threads={a.threads}"] if a.threads else []))
    run = Path(cfg.run.out)
    if not a.pack_only and not a.ensemble:
        train(cfg, stop_after=a.stop_after)
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    if last["step"] < cfg.optim.steps:
        sys.exit(f"{run} is at step {last['step']} of {cfg.optim.steps}: train it to the end first")
    members = [resolve_model(m) for m in a.ensemble or [run]]
    names = [shown_name(m) for m in a.ensemble or [run]]   # the card names members as given, not by local path
    weights, mirror, tau, by_tau, bias = held_out_choice(run, cfg, members, a.pasted)
    print(f"on the held-out split: member weights {weights}, mirror_average {mirror}, logit adjustment tau {tau} "
          f"(macro-F1 (7): {by_tau})")
    source = run
    if a.ensemble:
        source = ensemble_checkpoint(members, run / f"ensemble_{a.name}.pt", weights)
    path = pack(source, a.name, {}, face_frame=cfg.data.face_frame, head_bias=bias, mirror_average=mirror,
                weights=a.weights)
    raw, s = evaluate_path(source, data=cfg.data.test), evaluate_path(path, data=cfg.data.test)
    present = [n for n, row in zip(ABAW_LABELS, s["confusion"]) if sum(row) > 0]

    def summary(sc: dict) -> dict:
        return {"accuracy": sc["accuracy"], "macro_f1_7": float(np.mean([sc["per_class_f1"][n] for n in present])),
                "macro_f1_8": sc["macro_f1"]}

    results = json.loads((run / "results.json").read_text())
    card = {
        "trained_on": f"FER2013 train ({cfg.data.labeled}), all labels; {cfg.data.val_fraction:.0%} held out to choose "
                      "the checkpoint and the logit adjustment",
        "scored_on": f"{cfg.data.test} ({s['count']} faces)",
        "scores": summary(s),
        "per_class_f1": {n: s["per_class_f1"][n] for n in present},
        "mirror_average": mirror,
        "logit_adjustment": {"tau": tau, "head_bias": [round(float(b), 6) for b in bias]},
        "held_out_macro_f1_7": by_tau,
        **({"held_out_choice": "mean macro-F1 (7) of the held-out faces as cropped in FER2013 and as predict crops "
                               f"them pasted into photos ({a.pasted.name})"} if a.pasted else {}),
        "scores_without_adjustment": summary(raw),
        "per_class_f1_without_adjustment": {n: raw["per_class_f1"][n] for n in present},
        "command": f"python benchmarks/train_bundled.py --config {shown}"
                   + (f" --name {a.name} --ensemble {' '.join(a.ensemble)}" if a.ensemble else "")
                   + (f" --pasted {shown_name(a.pasted)}" if a.pasted else "")
                   + (f" --weights {a.weights}" if a.weights != "float16" else ""),
        "weights_stored_as": a.weights,
        # an ensemble trains nothing itself: its cost is its members' (run clocks; trained one per core)
        "train_seconds": None if a.ensemble else results.get("wall_s"),
        "best_step": None if a.ensemble else results.get("best_step"),
        **({"ensemble": {"members": names, "weights": weights,
                         "member_train_seconds": {n: member_seconds(m) for n, m in zip(names, a.ensemble)},
                         "member_scores": {n: summary(evaluate_path(m, data=cfg.data.test)) for n, m in zip(names, members)}}}
           if a.ensemble else {}),
        "licence": "FER2013 is for research use (ICML 2013 challenge, Kaggle terms); so are these weights",
    }
    out = ROOT / "docs" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bundled_{a.name}.json").write_text(json.dumps({**card, "confusion": s["confusion"]}, indent=1))
    plot_confusion(s["confusion"], out / f"bundled_{a.name}_confusion.png", title=f"{a.name} on fer2013/val")
    path = pack(source, a.name, card, face_frame=cfg.data.face_frame, head_bias=bias, mirror_average=mirror,
                weights=a.weights)
    print(json.dumps(card["scores"]), "without adjustment:", json.dumps(card["scores_without_adjustment"]),
          f"-> {path} ({path.stat().st_size / 1e6:.1f} MB)")


def member_seconds(member) -> float | None:
    """Training wall time of an ensemble member: its run's results.json, or a bundled model's card."""
    from semifer.bundled import available, card

    p = Path(member)
    if (p / "results.json").is_file():
        return json.loads((p / "results.json").read_text()).get("wall_s")
    if str(member) in available():
        return card(str(member)).get("train_seconds")
    return None


def shown_name(member) -> str:
    """A member as the card records it: a bundled name as is, a path relative to the repository."""
    p = Path(member).resolve()
    if not Path(member).exists():
        return str(member)
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(member)


def held_out_choice(run: Path, cfg, members: list, pasted: Path | None = None):
    """(member weights or None, mirror_average, tau, held-out macro-F1 (7) of every choice, head bias):
    the inference settings with the best macro-F1 on the run's own held-out split (split.json),
    never the test set; with ``pasted``, the best mean of that and the macro-F1 of the same faces
    as predict crops them from photos. Member weights are searched in steps of 0.1 (every member
    at least 0.1)."""
    import torch

    from semifer.bundled import adjustment_bias, prior_adjustment
    from semifer.data.formats import load_source
    from semifer.eval.evaluate import predict_logits
    from semifer.eval.report import load_model
    from semifer.labels import NUM_CLASSES

    split = json.loads((run / "split.json").read_text())
    ds = load_source(split["source"], cfg.data)
    held = torch.tensor(split["val"])
    trained = torch.ones(len(ds.labels), dtype=torch.bool)
    trained[held] = False
    prior = torch.bincount(torch.as_tensor(ds.labels)[trained], minlength=NUM_CLASSES).float()
    prior = prior / prior.sum()
    inputs = [ds.images[held]]
    found = None
    if pasted is not None:
        x_pasted, found = pasted_crops(run / "split.json", pasted, cfg)
        inputs.append(x_pasted)
    y = torch.as_tensor(ds.labels)[held].numpy()
    views = []   # per member, per input: (plain logits, mirror-averaged logits)
    for m in members:
        model, mcfg, _ = load_model(m)
        split_of = (mcfg.data.labeled, mcfg.data.val_fraction, mcfg.data.split_seed)
        if split_of != (cfg.data.labeled, cfg.data.val_fraction, cfg.data.split_seed):
            raise SystemExit(f"{m} held out {split_of}, not the split of {run}: its scores there would be on training faces")
        model.mirror_average = False
        per_input = []
        with torch.inference_mode():
            for x in inputs:
                plain = predict_logits(model, x)
                per_input.append((plain, (plain + predict_logits(model, x.flip(3))) / 2))
        views.append(per_input)
    grid = [None] if len(members) == 1 else weight_grid(len(members))
    not_found = _not_found_logits()
    table, best = {}, None
    for weights in grid:
        w = torch.tensor(weights or [1.0]) / sum(weights or [1.0])
        for mirror in (False, True):
            scores = []
            for i in range(len(inputs)):
                logits = sum(wk * v[i][int(mirror)] for wk, v in zip(w, views))
                if i == 1:   # a face predict did not find is wrong: "Other", a class FER2013 lacks
                    logits = torch.where(torch.as_tensor(found)[:, None], logits, not_found)
                scores.append(prior_adjustment(logits, y, prior)[1])
            by_tau = {t: sum(sc[t] for sc in scores) / len(scores) for t in scores[0]}
            tau = max(by_tau, key=lambda t: (round(by_tau[t], 6), -t))
            table.update({f"weights={weights} mirror={mirror} tau={t}" if weights else f"mirror={mirror} tau={t}":
                          round(v, 4) for t, v in by_tau.items()})
            if best is None or by_tau[tau] > best[3] + 1e-6:
                best = (weights, mirror, tau, by_tau[tau])
    return best[0], best[1], best[2], table, adjustment_bias(prior, best[2])


def _not_found_logits():
    """Logits that predict "Other" (no FER2013 face has it): a face predict did not find is wrong."""
    import torch

    from semifer.labels import ABAW_LABELS, NUM_CLASSES

    z = torch.zeros(NUM_CLASSES)
    z[ABAW_LABELS.index("Other")] = 1e4
    return z


def pasted_crops(split_json: Path, faces_npz: Path, cfg):
    """The held-out faces of ``split_json`` pasted into photos (benchmarks/pasted_faces.py) and cut
    by predict's crop from the cached detections -> (uint8 (N, C, S, S), found (N,) bool)."""
    import numpy as np
    import torch
    from PIL import Image

    from pasted_faces import backgrounds, load_cache, paste, split_files
    from semifer.data.decode import decode_image
    from semifer.faces.align import CROP_SIZE, UPRIGHT_FRAMES, crop_face

    files, side = split_files(split_json), 48 * 3
    faces = load_cache(faces_npz, files, side)
    if faces is None:
        raise SystemExit(f"{faces_npz} holds no detections of this split's held-out faces: make it with "
                         f"python benchmarks/pasted_faces.py --split {split_json} --cache {faces_npz}")
    size, chans, frame = cfg.data.image_size, cfg.data.channels, cfg.data.face_frame
    crop_size = size if frame in UPRIGHT_FRAMES else CROP_SIZE   # as Predictor.crops
    bgs, out = backgrounds(side), []
    for i, ((f, _), face) in enumerate(zip(files, faces)):
        if face is None:
            out.append(np.zeros((chans, size, size), np.uint8))
            continue
        canvas = paste(Image.open(f).convert("RGB"), i, bgs, side)
        out.append(decode_image(crop_face(canvas, face, crop_size, frame), size, chans)[0])
    return torch.from_numpy(np.stack(out)), np.array([fc is not None for fc in faces])


def weight_grid(n: int, steps: int = 10) -> list[list[float]]:
    """Every way to give ``n`` members weights k/steps (k >= 1) that sum to 1."""
    import itertools

    return [[round(k / steps, 1) for k in ks] for ks in itertools.product(range(1, steps), repeat=n)
            if sum(ks) == steps]


if __name__ == "__main__":
    main()
