"""Class-stratified labeled subsets and their use in training."""
import json

import pytest
import torch

import semifer
from semifer.data.splits import stratified_subset
from tests.conftest import tiny_config


def test_fraction_is_per_class_and_deterministic():
    labels = torch.tensor([0] * 50 + [1] * 20 + [2] * 3 + [-1] * 5)
    chosen, rest = stratified_subset(labels, fraction=0.1, seed=3)
    counts = torch.bincount(labels[chosen], minlength=3).tolist()
    assert counts == [5, 2, 1]  # 10 % rounded, never below one per class
    assert torch.equal(chosen, stratified_subset(labels, fraction=0.1, seed=3)[0])
    assert not torch.equal(chosen, stratified_subset(labels, fraction=0.1, seed=4)[0])
    assert sorted(chosen.tolist() + rest.tolist()) == list(range(len(labels)))


def test_per_class_count_and_bad_arguments():
    labels = torch.tensor([0] * 10 + [1] * 2)
    chosen, _ = stratified_subset(labels, per_class=4, seed=0)
    assert torch.bincount(labels[chosen]).tolist() == [4, 2]
    with pytest.raises(ValueError):
        stratified_subset(labels, fraction=0.5, per_class=2)
    with pytest.raises(ValueError):
        stratified_subset(labels)


def test_training_on_a_split_saves_it_and_uses_the_rest_as_unlabeled(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "r", algorithm="dtm", steps=2,
                      data={"labeled_per_class": 2, "unlabeled": []})
    res = semifer.train(cfg)
    split = json.loads((res.run_dir / "split.json").read_text())
    assert len(split["labeled"]) == 16 and len(split["rest"]) == 48 - 16
    # DTM holds a class-stratified slice of the labeled split out for calibration (10 %, >= 1 per class).
    held = json.loads((res.run_dir / "holdout.json").read_text())
    assert len(held["labeled"]) == 8 and len(held["rest"]) == 8 and held["fraction"] == 0.1
    assert sorted(held["labeled"] + held["rest"]) == list(range(16))
    labels = torch.tensor(split["labeled"]) // 6  # the tiny labeled source is 6 faces per class, in class order
    assert sorted(labels[held["labeled"]].tolist()) == list(range(8))
    info = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()
            if '"info"' in line][0]
    assert info["labeled"] == 8 and info["unlabeled"] == 32


def test_algorithms_without_a_holdout_train_on_the_whole_labeled_split(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "r", algorithm="dtm_flex", steps=1,
                      data={"labeled_per_class": 2, "unlabeled": []})
    res = semifer.train(cfg)
    assert not (res.run_dir / "holdout.json").exists()
    info = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()
            if '"info"' in line][0]
    assert info["labeled"] == 16


def test_pseudo_label_accuracy_uses_the_known_part_of_a_mixed_unlabeled_set(tiny_data, tmp_path):
    from semifer.engine.runlog import read_metrics

    cfg = tiny_config(tiny_data, tmp_path / "r", algorithm="fixmatch", steps=4, ssl={"tau": 0.0},
                      data={"labeled_per_class": 2})  # rest has hidden truth, the npz set has none
    res = semifer.train(cfg)
    train = [r for r in read_metrics(res.run_dir) if r["kind"] == "train"]
    assert all(r.get("pseudo_acc") is not None and 0.0 <= r["pseudo_acc"] <= 1.0 for r in train)
