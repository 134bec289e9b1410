"""Every registered algorithm trains a few steps through the one engine."""
import pytest
import torch

from semifer.engine import train
from semifer.engine.checkpoint import load_checkpoint
from semifer.engine.runlog import read_metrics
from semifer.models import build_model
from semifer.registry import ALGORITHMS
from tests.conftest import tiny_config


# dtm_rounds learns from unlabeled faces only once a round's teacher has accepted some: one
# supervised step, then a round per step (3 rounds in 3 steps), with a precision target any
# class's predictions meet, so the untrained teacher already opens classes.
SSL_OVERRIDES = {"dtm_rounds": {"warmup_steps": 1, "rounds": 3, "target_precision": 0.05, "precision_floor": 0.0}}


@pytest.mark.parametrize("name", ALGORITHMS.names())
def test_algorithm_runs_and_changes_weights(name, tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / name, algorithm=name, steps=4, ssl=SSL_OVERRIDES.get(name, {}))
    res = train(cfg)
    assert res.completed and res.steps == 4
    ckpt = load_checkpoint(tmp_path / name / "checkpoints" / "last.pt")
    torch.manual_seed(cfg.run.seed)  # the engine seeds before building the model
    fresh = build_model(cfg.model, 8, 3)
    changed = [k for k, v in fresh.state_dict().items() if v.is_floating_point() and not torch.equal(v, ckpt["model"][k])]
    assert changed, "training did not change any weight"
    train_recs = [r for r in read_metrics(tmp_path / name) if r["kind"] == "train"]
    assert train_recs and all(r["loss"] is not None for r in train_recs)
    if ALGORITHMS.get(name).uses_unlabeled:
        assert {"loss_u", "mask_rate", "thresholds", "pseudo_class_mix"} <= set(train_recs[-1])
        assert len(train_recs[-1]["thresholds"]) == 8
    else:
        assert "loss_u" not in train_recs[-1]
