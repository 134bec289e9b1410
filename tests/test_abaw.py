"""ABAW writers: exact layouts, fill policies and frame-count checks."""
from __future__ import annotations

import numpy as np
import pytest

from semifer.infer.abaw import (HEADER, SINGLE_HEADER, fill_labels, read_video_txt, write_single_file,
                                write_video_txt)
from semifer.labels import ABAW_LABELS


def test_headers_follow_abaw_order():
    assert HEADER == "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other"
    assert SINGLE_HEADER == "image_location," + HEADER
    assert HEADER.split(",") == list(ABAW_LABELS)


@pytest.mark.parametrize("policy, expected", [
    ("nearest", [4, 4, 4, 4, 2, 2, 2, 2]),   # frame 3 ties between 2 and 4 -> the earlier one
    ("previous", [4, 4, 4, 4, 2, 2, 2, 2]),
    ("neutral", [0, 0, 4, 0, 2, 0, 0, 0]),
])
def test_fill_policies(policy, expected):
    assert fill_labels({2: 4, 4: 2}, 8, policy).tolist() == expected


def test_nearest_differs_from_previous():
    labels = {0: 1, 5: 3}
    assert fill_labels(labels, 6, "nearest").tolist() == [1, 1, 1, 3, 3, 3]
    assert fill_labels(labels, 6, "previous").tolist() == [1, 1, 1, 1, 1, 3]
    assert fill_labels({}, 3, "nearest").tolist() == [0, 0, 0]


def test_video_txt_has_one_label_per_frame(tmp_path):
    path = tmp_path / "abaw" / "video1.txt"
    written = write_video_txt(path, {0: 4, 9: 6}, 10)
    lines = path.read_text().splitlines()
    assert lines[0] == HEADER and len(lines) == 11
    assert [int(x) for x in lines[1:]] == written.tolist() == [4] * 5 + [6] * 5
    assert read_video_txt(path, 10).tolist() == written.tolist()


def test_single_file_layout(tmp_path):
    path = tmp_path / "pred.txt"
    n = write_single_file(path, {"b": ({0: 1}, 2), "a": ({1: 5}, 3)})
    lines = path.read_text().splitlines()
    assert n == 5 and lines[0] == SINGLE_HEADER
    assert lines[1:] == ["a/00001.jpg,5", "a/00002.jpg,5", "a/00003.jpg,5", "b/00001.jpg,1", "b/00002.jpg,1"]


@pytest.mark.badinput
def test_frame_count_mismatch_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="frame 12 .*10 frames"):
        write_video_txt(tmp_path / "v.txt", {0: 1, 12: 2}, 10)
    assert not (tmp_path / "v.txt").exists()  # nothing half-written
    with pytest.raises(ValueError, match="positive"):
        write_single_file(tmp_path / "s.txt", {"v": ({}, 0)})
    with pytest.raises(ValueError, match="outside"):
        write_video_txt(tmp_path / "v.txt", {0: 8}, 3)
    write_video_txt(tmp_path / "v.txt", {0: 1}, 4)
    with pytest.raises(ValueError, match="4 labels for a video of 5 frames"):
        read_video_txt(tmp_path / "v.txt", 5)
    (tmp_path / "bad.txt").write_text("Neutral,Anger\n1\n")
    with pytest.raises(ValueError, match="header"):
        read_video_txt(tmp_path / "bad.txt")
    with pytest.raises(ValueError, match="fill policy"):
        fill_labels({0: 1}, 3, "mode")


def test_fill_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(1, 30))
        frames = sorted(set(rng.integers(0, n, int(rng.integers(1, n + 1))).tolist()))
        labels = {f: int(rng.integers(0, 8)) for f in frames}
        got = fill_labels(labels, n, "nearest").tolist()
        want = [labels[min(frames, key=lambda k: (abs(k - i), k))] for i in range(n)]
        assert got == want
