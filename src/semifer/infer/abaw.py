"""ABAW expression-challenge prediction files, checked against the videos' frame counts.

Two layouts (labels are indices into :data:`semifer.labels.ABAW_LABELS`):

* per video, ``VIDEO.txt``: the header ``Neutral,Anger,...,Other`` then exactly one label per
  frame of the video, frame 1 first;
* one file for all videos: the header ``image_location,Neutral,...,Other`` then
  ``VIDEO/00001.jpg,LABEL`` for every frame (1-based, five digits: Aff-Wild2's crop names).

ABAW scores every frame, also those where no face was found. Fill policy for frames
without a prediction (``nearest``, the default): the label of the nearest frame that has
one, the earlier frame on a tie; ``previous`` carries the last label forward (frames
before the first prediction take the first); ``neutral`` writes 0. A video without any
prediction is all Neutral (0) under every policy.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from semifer.labels import ABAW_LABELS

HEADER = ",".join(ABAW_LABELS)
SINGLE_HEADER = "image_location," + HEADER
FILL_POLICIES = ("nearest", "previous", "neutral")


def check_frames(labels: dict[int, int], num_frames: int, video: str = "video") -> None:
    """Raise ValueError unless every predicted frame index and label fits a video of ``num_frames``."""
    if num_frames <= 0:
        raise ValueError(f"{video}: frame count must be positive, got {num_frames}")
    bad = [f for f in labels if not 0 <= int(f) < num_frames]
    if bad:
        raise ValueError(f"{video}: predictions for frame {max(bad) if max(bad) >= 0 else min(bad)} (0-based) but "
                         f"the video has {num_frames} frames; frame counts do not match")
    wrong = sorted({int(v) for v in labels.values() if not 0 <= int(v) < len(ABAW_LABELS)})
    if wrong:
        raise ValueError(f"{video}: labels {wrong} are outside 0..{len(ABAW_LABELS) - 1}")


def fill_labels(labels: dict[int, int], num_frames: int, policy: str = "nearest", video: str = "video") -> np.ndarray:
    """One label per frame (``num_frames``,) from sparse ``{frame: label}``, gaps filled by ``policy``."""
    if policy not in FILL_POLICIES:
        raise ValueError(f"unknown fill policy {policy!r}; choose from {FILL_POLICIES}")
    check_frames(labels, num_frames, video)
    out = np.zeros(num_frames, np.int64)
    if not labels or policy == "neutral":
        for f, v in labels.items():
            out[int(f)] = int(v)
        return out
    known = np.array(sorted(int(f) for f in labels))
    values = np.array([int(labels[f]) for f in sorted(labels, key=int)])
    frames = np.arange(num_frames)
    after = np.clip(np.searchsorted(known, frames), 0, len(known) - 1)   # first known >= frame
    before = np.clip(after - (known[after] > frames), 0, len(known) - 1)  # last known <= frame
    if policy == "previous":
        pick = np.where(known[before] <= frames, before, 0)
    else:
        pick = np.where(np.abs(frames - known[before]) <= np.abs(known[after] - frames), before, after)
    return values[pick]


def _write_lines(path: Path, lines: list[str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_video_txt(path: Path | str, labels: dict[int, int], num_frames: int, policy: str = "nearest") -> np.ndarray:
    """Write one video's ABAW ``.txt`` (header + ``num_frames`` labels); returns the labels written."""
    full = fill_labels(labels, num_frames, policy, video=Path(path).stem)
    _write_lines(Path(path), [HEADER, *map(str, full.tolist())])
    return full


def write_single_file(path: Path | str, videos: dict[str, tuple[dict[int, int], int]], policy: str = "nearest") -> int:
    """Write the one-file layout for ``{video name: (labels, frame count)}``; returns the row count."""
    lines = [SINGLE_HEADER]
    for name in sorted(videos):
        labels, n = videos[name]
        full = fill_labels(labels, n, policy, video=name)
        lines += [f"{name}/{i + 1:05d}.jpg,{v}" for i, v in enumerate(full.tolist())]
    _write_lines(Path(path), lines)
    return len(lines) - 1


def read_video_txt(path: Path | str, num_frames: int | None = None) -> np.ndarray:
    """Labels of an ABAW ``.txt`` (annotation or prediction), checking header and frame count."""
    lines = Path(path).read_text().splitlines()
    if not lines or lines[0].strip() != HEADER:
        raise ValueError(f"{path}:1: expected the header {HEADER!r}")
    try:
        labels = np.array([int(x) for x in lines[1:]], np.int64)
    except ValueError as e:
        raise ValueError(f"{path}: every line after the header must be one integer label ({e})") from None
    if num_frames is not None and len(labels) != num_frames:
        raise ValueError(f"{path}: {len(labels)} labels for a video of {num_frames} frames")
    return labels


def labels_from_predictions(csv_path: Path | str) -> dict[str, dict[int, int]]:
    """``{source: {frame: label index}}`` from ``predictions.csv``: per frame, the face with the
    highest detector score (ABAW annotates one person per video); no-face rows are gaps."""
    best: dict[str, dict[int, tuple[float, int]]] = {}
    with open(csv_path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        for row in csv.DictReader(f):
            frames = best.setdefault(row["source"], {})
            if not row["label"] or row["label"] not in ABAW_LABELS:
                continue
            score, frame = float(row["score"] or 0.0), int(row["frame"])
            if frame not in frames or score > frames[frame][0]:
                frames[frame] = (score, ABAW_LABELS.index(row["label"]))
    return {s: {k: v[1] for k, v in fr.items()} for s, fr in best.items()}
