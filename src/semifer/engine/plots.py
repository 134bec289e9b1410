"""PNG plots of a run, drawn from ``RUN_DIR/metrics.jsonl`` into ``RUN_DIR/plots/``.

Uses matplotlib's object-oriented API with the Agg canvas only (no pyplot), so it
works headless and never changes the process-wide backend or leaks open figures.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from semifer.engine.runlog import read_metrics
from semifer.labels import ABAW_LABELS, NUM_CLASSES

__all__ = ["PLOTS_DIR", "write_plots", "plot_confusion"]

PLOTS_DIR = "plots"
DPI = 110
# tab10 gives 8 well-separated colours; the same class keeps its colour in every plot.
_CLASS_COLORS = [f"C{i}" for i in range(NUM_CLASSES)]


# --------------------------------------------------------------------------- data
def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _series(records: list[dict], kind: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of numeric ``key`` in records of ``kind``; missing/null skipped."""
    steps, vals = [], []
    for r in records:
        if r["kind"] == kind and key in r:
            v = _num(r[key])
            if not math.isnan(v):
                steps.append(r["step"])
                vals.append(v)
    return np.asarray(steps, dtype=float), np.asarray(vals, dtype=float)


def _class_series(records: list[dict], kind: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and an (n, 8) array of per-class ``key``; accepts a list of 8 or a name->value dict."""
    steps, rows = [], []
    for r in records:
        if r["kind"] != kind or key not in r:
            continue
        v = r[key]
        if isinstance(v, dict):
            row = [_num(v.get(name)) for name in ABAW_LABELS]
        elif isinstance(v, list) and len(v) == NUM_CLASSES:
            row = [_num(x) for x in v]
        else:
            continue
        steps.append(r["step"])
        rows.append(row)
    return np.asarray(steps, dtype=float), np.asarray(rows, dtype=float).reshape(-1, NUM_CLASSES)


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Centered moving average that keeps the length (edges use fewer points)."""
    kernel = np.ones(window)
    num = np.convolve(y, kernel, mode="same")
    den = np.convolve(np.ones_like(y), kernel, mode="same")
    return num / den


# --------------------------------------------------------------------------- drawing
def _new_figure(width: float, height: float, nrows: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, list(axes)


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _class_legend(ax) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def _marker_for(n: int) -> str | None:
    # Sparse series (a few evals) need markers to be readable; dense ones do not.
    return "o" if n <= 60 else None


def _grid(width: float, height: float, rows: int, cols: int) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)


def _stage_starts(records: list[dict]) -> list[int]:
    """Steps where a stage begins: the first step with a non-zero lambda_u, and each round's start."""
    starts = sorted({int(r["step"]) for r in records if r["kind"] == "round"})
    lam_steps, lam = _series(records, "train", "lambda_u")
    on = lam_steps[lam > 0]
    if on.size and (not starts or on.min() < starts[0]):
        starts.insert(0, int(on.min()))
    return starts


def _plot_thresholds(records: list[dict], path: Path) -> Path | None:
    """One small panel per class (so no class hides another), stage starts marked."""
    steps, th = _class_series(records, "train", "thresholds")
    if not len(steps):
        return None
    stages = _stage_starts(records)
    fig, axes = _grid(11.0, 5.2, 2, 4)
    for i, name in enumerate(ABAW_LABELS):
        ax = axes.flat[i]
        ax.plot(steps, th[:, i], color=_CLASS_COLORS[i], lw=1.5, marker=_marker_for(len(steps)), ms=3)
        for k, s0 in enumerate(stages):
            ax.axvline(s0, color="grey", ls=":", lw=0.9, label="stage start" if k == 0 else None)
        ax.set_title(name, fontsize=9, color=_CLASS_COLORS[i])
        ax.set_ylim(-0.02, 1.04)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step")
    for ax in axes[:, 0]:
        ax.set_ylabel("threshold")
    if stages:
        axes.flat[0].legend(loc="lower left", fontsize=7)
    fig.suptitle("Per-class confidence thresholds (1.0 = class closed)", fontsize=10)
    return _save(fig, path)


def _plot_stages(records: list[dict], path: Path) -> Path | None:
    """Per class and per stage (round): threshold, accepted faces, accuracy of accepted where known."""
    rounds = [r for r in records if r["kind"] == "round"]
    if not rounds:
        return None
    x = np.arange(len(rounds))
    fig, (a1, a2, a3) = _new_figure(8.0, 8.0, nrows=3)
    for i, name in enumerate(ABAW_LABELS):
        th = [_num((r.get("thresholds") or [math.nan] * NUM_CLASSES)[i]) for r in rounds]
        n = [_num((r.get("accepted_per_class") or [math.nan] * NUM_CLASSES)[i]) for r in rounds]
        acc = [_num((r.get("accepted_accuracy") or [math.nan] * NUM_CLASSES)[i]) for r in rounds]
        kw = dict(color=_CLASS_COLORS[i], marker="o", ms=4, lw=1.3, label=name)
        a1.plot(x + 0.03 * (i - 3.5), th, **kw)  # small offsets: equal thresholds stay visible
        a2.plot(x, np.maximum(np.asarray(n, dtype=float), 0.5), **kw)
        a3.plot(x + 0.03 * (i - 3.5), acc, **kw)
    a1.set(title="Threshold per class at each stage (1.0 = closed)", ylabel="threshold", ylim=(-0.02, 1.04))
    a2.set(title="Accepted pseudo-labels per class", ylabel="faces (log)", yscale="log")
    a3.set(title="Accuracy of accepted pseudo-labels whose truth is known", ylabel="accuracy",
           ylim=(-0.02, 1.02), xlabel="stage")
    a3.set_xticks(x, [f"round {r.get('round', k)}\nstep {r['step']}" for k, r in enumerate(rounds)])
    for ax in (a1, a2, a3):
        ax.grid(alpha=0.3)
    _class_legend(a1)
    return _save(fig, path)


def _plot_pseudo_labels(records: list[dict], path: Path) -> Path | None:
    mstep, mask = _series(records, "train", "mask_rate")
    astep, acc = _series(records, "train", "pseudo_acc")
    cstep, mix = _class_series(records, "train", "pseudo_class_mix")
    if not (len(mstep) or len(cstep)):
        return None
    fig, (ax1, ax2) = _new_figure(7.5, 6.0, nrows=2)
    if len(mstep):
        ax1.plot(mstep, mask, color="C0", lw=1.3, label="acceptance rate (mask_rate)",
                 marker=_marker_for(len(mstep)), ms=3)
    if len(astep):
        ax1.plot(astep, acc, color="C3", lw=1.3, label="accuracy of accepted (pseudo_acc)",
                 marker=_marker_for(len(astep)), ms=3)
    if len(mstep) or len(astep):
        ax1.legend(loc="lower right", fontsize=8)
    else:
        ax1.text(0.5, 0.5, "no mask_rate logged", ha="center", va="center",
                 transform=ax1.transAxes, color="grey")
    ax1.set(title="Pseudo-labels on unlabeled data", ylabel="fraction", ylim=(-0.02, 1.02))
    ax1.grid(alpha=0.3)

    if len(cstep):
        mix = np.nan_to_num(mix, nan=0.0)
        # Normalise rows so counts work too; all-zero rows (nothing accepted) stay zero.
        tot = mix.sum(axis=1, keepdims=True)
        mix = np.divide(mix, tot, out=np.zeros_like(mix), where=tot > 0)
        ax2.stackplot(cstep, mix.T, labels=ABAW_LABELS, colors=_CLASS_COLORS, alpha=0.85)
        ax2.set_xlim(cstep.min(), cstep.max() if cstep.max() > cstep.min() else cstep.min() + 1)
        _class_legend(ax2)
    else:
        ax2.text(0.5, 0.5, "no pseudo_class_mix logged", ha="center", va="center",
                 transform=ax2.transAxes, color="grey")
    ax2.set(title="Class mix of accepted pseudo-labels", xlabel="step",
            ylabel="share", ylim=(0, 1))
    return _save(fig, path)


def _val_name(records: list[dict]) -> str:
    """The validation source the eval records score (from the run's info record)."""
    name = next((r["val_source"] for r in records if r["kind"] == "info" and r.get("val_source")), "")
    return f"validation set {name}" if name else "validation set"


def _plot_macro_f1(records: list[dict], path: Path) -> Path | None:
    fstep, f1 = _series(records, "eval", "macro_f1")
    astep, acc = _series(records, "eval", "accuracy")
    if not (len(fstep) or len(astep)):
        return None
    fig, (ax,) = _new_figure(7.0, 4.0)
    if len(fstep):
        ax.plot(fstep, f1, color="C0", lw=1.6, marker=_marker_for(len(fstep)), ms=4,
                label="macro-F1")
    if len(astep):
        ax.plot(astep, acc, color="C2", lw=1.2, ls="--", marker=_marker_for(len(astep)), ms=3,
                label="accuracy")
    if len(fstep):
        b = int(np.argmax(f1))  # first occurrence of the maximum
        ax.axvline(fstep[b], color="C0", ls=":", lw=1)
        ax.plot([fstep[b]], [f1[b]], marker="*", ms=14, color="C1", zorder=5,
                label=f"best macro-F1 {f1[b]:.4f} @ step {int(fstep[b])}")
    ax.set(title=f"Evaluation on the {_val_name(records)}", xlabel="step", ylabel="score")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _plot_loss(records: list[dict], path: Path) -> Path | None:
    series = [(k, *_series(records, "train", k)) for k in ("loss", "loss_x", "loss_u")]
    series = [s for s in series if len(s[1])]
    if not any(k == "loss_u" for k, *_ in series):
        # Supervised: loss == loss_x, and one line would hide the other.
        series = [s for s in series if s[0] != "loss_x"]
    if not series:
        return None
    fig, (ax,) = _new_figure(7.0, 4.0)
    for i, (key, steps, vals) in enumerate(series):
        color = f"C{i}"
        if len(vals) >= 100:
            # Raw per-step losses are noisy: faint raw line plus a moving average.
            ax.plot(steps, vals, color=color, lw=0.6, alpha=0.3)
            ax.plot(steps, _smooth(vals, max(5, len(vals) // 50)), color=color, lw=1.6,
                    label=f"{key} (smoothed)")
        else:
            ax.plot(steps, vals, color=color, lw=1.4, marker=_marker_for(len(vals)), ms=3,
                    label=key)
    ax.set(title="Training loss", xlabel="step", ylabel="loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def plot_confusion(
    confusion,
    path: Path | str,
    title: str = "Confusion matrix",
    class_names: Sequence[str] | None = None,
) -> Path:
    """Save a row-normalised confusion matrix (rows = true, cols = predicted) with counts.

    ``confusion`` is a square nested list / array / tensor of counts. Class names
    default to :data:`ABAW_LABELS` for 8 classes, else indices.
    """
    cm = np.asarray(confusion.tolist() if hasattr(confusion, "tolist") else confusion, dtype=float)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {cm.shape}")
    n = cm.shape[0]
    if class_names is None:
        class_names = ABAW_LABELS if n == len(ABAW_LABELS) else [str(i) for i in range(n)]
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)

    fig, (ax,) = _new_figure(0.75 * n + 2.6, 0.7 * n + 1.4)
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label="fraction of true class")
    fs = 8 if n <= 10 else 6
    for i in range(n):
        for j in range(n):
            count = cm[i, j]
            txt = f"{int(count)}" if float(count).is_integer() else f"{count:.1f}"
            ax.text(j, i, txt, ha="center", va="center", fontsize=fs,
                    color="white" if norm[i, j] > 0.55 else "black")
    ax.set_xticks(range(n), list(class_names), rotation=40, ha="right", fontsize=fs + 1)
    ax.set_yticks(range(n), [f"{c} (n={int(r)})" for c, r in zip(class_names, rows[:, 0])],
                  fontsize=fs + 1)
    ax.set(title=title, xlabel="predicted", ylabel="true")
    return _save(fig, Path(path))


def _plot_best_confusion(records: list[dict], path: Path) -> Path | None:
    evals = [r for r in records if r["kind"] == "eval" and isinstance(r.get("confusion"), list)]
    if not evals:
        return None
    scored = [r for r in evals if not math.isnan(_num(r.get("macro_f1")))]
    if scored:
        # max() keeps the first of equal scores: the earliest best step, as in macro_f1.png.
        best = max(scored, key=lambda r: r["macro_f1"])
        title = f"Confusion at best macro-F1 {best['macro_f1']:.4f} (step {best['step']})"
    else:
        best = evals[-1]
        title = f"Confusion at step {best['step']}"
    title += f"\n{_val_name(records)}"
    return plot_confusion(best["confusion"], path, title=title)


_PLOTS = (
    ("thresholds.png", _plot_thresholds),
    ("stages.png", _plot_stages),
    ("pseudo_labels.png", _plot_pseudo_labels),
    ("macro_f1.png", _plot_macro_f1),
    ("loss.png", _plot_loss),
    ("confusion.png", _plot_best_confusion),
)


def write_plots(run_dir: Path | str) -> list[Path]:
    """Write the run's PNG plots into ``RUN_DIR/plots/`` and return the paths written.

    A plot whose data is absent from ``metrics.jsonl`` (e.g. thresholds in a
    supervised run) is skipped, not an error. Raises ``FileNotFoundError`` when the
    run has no metrics file.
    """
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    out_dir = run_dir / PLOTS_DIR
    written = []
    for name, fn in _PLOTS:
        p = fn(records, out_dir / name)
        if p is not None:
            written.append(p)
    return written
