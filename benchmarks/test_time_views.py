"""Test-time views of a bundled model: shifted and zoomed copies of each face, averaged with the
mirror-averaged logits the model already uses, scored on the held-out 5 % of FER2013 train that
every bundled member held out (``data.val_fraction``, ``data.split_seed``), never on the test set
unless asked (``--sets heldout,val``).

    python benchmarks/test_time_views.py [--model fer2013-cnn32x2] [--sets heldout] [--threads 2]

Prints accuracy and macro-F1 (7) for each set of views. Each extra view costs one more pair of
classifier passes per face (face and mirror image), which video prediction pays on every frame.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from semifer.bundled import resolve_model
from semifer.data.formats import load_source
from semifer.data.splits import stratified_subset
from semifer.eval.metrics import classification_scores
from semifer.eval.report import load_model
from semifer.labels import ABAW_LABELS


def shift(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """``x`` moved by (dx, dy) pixels, the border reflected (as the weak training view does)."""
    p = max(abs(dx), abs(dy))
    if p == 0:
        return x
    h, w = x.shape[-2:]
    return F.pad(x, (p, p, p, p), mode="reflect")[..., p + dy:p + dy + h, p + dx:p + dx + w]


def zoom(x: torch.Tensor, s: float) -> torch.Tensor:
    """``x`` magnified by ``s`` about its centre (< 1: zoomed out, the border repeated)."""
    theta = torch.tensor([[1 / s, 0, 0], [0, 1 / s, 0]], dtype=x.dtype).expand(len(x), 2, 3)
    return F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False),
                         padding_mode="border", align_corners=False)


VIEWS = {"centre": lambda b: b, **{f"z{s}": (lambda s: lambda b: zoom(b, s))(s) for s in (0.9, 1.1, 1.2)}}
for _d in (2, 3, 4):
    for _dx, _dy in ((_d, 0), (-_d, 0), (0, _d), (0, -_d)):
        VIEWS[f"s{_d}:{_dx},{_dy}"] = (lambda dx, dy: lambda b: shift(b, dx, dy))(_dx, _dy)
COMBOS = {
    "mirror only (as shipped)": ["centre"],
    **{f"+ 4 shifts of {d} px": ["centre"] + [k for k in VIEWS if k.startswith(f"s{d}:")] for d in (2, 3, 4)},
    "+ zoom 0.9 and 1.1": ["centre", "z0.9", "z1.1"],
    "+ zoom 1.1": ["centre", "z1.1"],
    "+ zoom 1.1 and 1.2": ["centre", "z1.1", "z1.2"],
    "+ 4 shifts of 3 px + zoom 0.9 and 1.1": ["centre"] + [k for k in VIEWS if k.startswith("s3:")] + ["z0.9", "z1.1"],
}


@torch.inference_mode()
def mirrored_logits(model: torch.nn.Module, images: torch.Tensor, view, batch: int = 512) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        b = images[i:i + batch]
        b = view(b.float() / 255 if b.dtype == torch.uint8 else b)
        out.append((model(b) + model(b.flip(3))) / 2)
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="bundled model name or checkpoint (default: the default model)")
    ap.add_argument("--sets", default="heldout", help="comma-separated: heldout (5 %% of train), val (the test set)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, cfg, _ = load_model(resolve_model(a.model))
    model.mirror_average = False   # the mirror is averaged here, for every view
    sets = {}
    for name in a.sets.split(","):
        if name == "heldout":
            train = load_source(cfg.data.labeled, cfg.data)
            held, _ = stratified_subset(train.labels, fraction=cfg.data.val_fraction, seed=cfg.data.split_seed + 2)
            sets[name] = (train.images[held], train.labels[held])
        elif name == "val":
            test = load_source(cfg.data.test, cfg.data)
            sets[name] = (test.images, test.labels)
        else:
            raise SystemExit(f"--sets: unknown set {name!r} (heldout, val)")
    seven = [i for i, n in enumerate(ABAW_LABELS) if n != "Other"]
    print(f"| views | {' | '.join(f'{s} accuracy | {s} macro-F1 (7)' for s in sets)} |")
    print("|---|" + "---:|" * (2 * len(sets)))
    logits = {}
    for s, (x, _) in sets.items():
        t = time.time()
        logits[s] = {k: mirrored_logits(model, x, v) for k, v in VIEWS.items()}
        print(f"<!-- {s}: {len(x)} faces, {len(VIEWS)} views in {time.time() - t:.0f} s -->")
    for combo, keys in COMBOS.items():
        cells = []
        for s, (_, y) in sets.items():
            sc = classification_scores(y, (sum(logits[s][k] for k in keys) / len(keys)).argmax(1))
            f1_7 = sum(sc["per_class_f1"][ABAW_LABELS[i]] for i in seven) / len(seven)
            cells += [f"{sc['accuracy']:.4f}", f"{f1_7:.4f}"]
        print(f"| {combo} ({len(keys)} view{'s' if len(keys) > 1 else ''}) | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
