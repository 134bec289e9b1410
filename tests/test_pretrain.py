"""semifer pretrain (SimCLR stage 0): the loss learns, resume is exact, the output loads into a training run."""
from __future__ import annotations

import json

import pytest
import torch

from semifer.engine.checkpoint import load_checkpoint
from semifer.ssl.pretrain import nt_xent, pretrain
from tests.conftest import tiny_config

BATCH = 32


def _cfg(tiny_data, tmp_path, **sections):
    return tiny_config(tiny_data, tmp_path / "run", run={"progress": False}, **sections)


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_nt_xent_matches_its_formula():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 5, generator=g)
    t = 0.2
    zn = torch.nn.functional.normalize(z, dim=1)
    s = zn @ zn.t() / t
    n = 3
    ref = 0.0
    for i in range(2 * n):
        p = (i + n) % (2 * n)
        others = torch.cat([s[i, :i], s[i, i + 1:]])
        ref += -(s[i, p] - torch.logsumexp(others, 0))
    assert torch.allclose(nt_xent(z, t), ref / (2 * n), atol=1e-5)
    # Identical views of well-separated faces: near-zero loss; a sign flip of one view: large loss.
    e = torch.eye(4) * 10
    assert nt_xent(torch.cat([e, e]), 0.1) < 1e-3 < nt_xent(torch.cat([e, -e]), 0.1)


def test_loss_goes_down_and_output_loads_into_training(tiny_data, tmp_path):
    from semifer.engine import train

    cfg = _cfg(tiny_data, tmp_path)
    out = tmp_path / "pt"
    res = pretrain(cfg, out, steps=30, batch_size=BATCH)
    assert res["completed"] and res["steps"] == 30 and res["images"] == 240 + 48
    train_recs = [r for r in _records(out / "pretrain.jsonl") if r["kind"] == "train"]
    losses = [r["loss"] for r in train_recs]
    assert [r["step"] for r in train_recs] == [10, 20, 30]
    assert all(torch.isfinite(torch.tensor(x)) for x in losses)
    assert losses[-1] < losses[0] - 0.2, losses
    knn = [r for r in _records(out / "pretrain.jsonl") if r["kind"] == "knn"]
    assert len(knn) == 1 and 0 <= knn[0]["init_accuracy"] <= 1
    assert res["knn_pretrained"]["k"] == 20 and res["knn_pretrained"]["val"] == 80

    saved = load_checkpoint(out / "pretrained.pt")
    assert set(saved) == {"model", "config", "pretrain"}
    assert saved["pretrain"]["steps"] == 30 and saved["pretrain"]["images"] == 288
    # A supervised run initialised from it: every backbone tensor loads and is the pretrained one.
    tcfg = tiny_config(tiny_data, tmp_path / "ft", algorithm="supervised", steps=1,
                       model={"pretrained": str(out / "pretrained.pt")}, run={"progress": False})
    train(tcfg)
    info = _records(tmp_path / "ft" / "metrics.jsonl")[0]
    assert info["kind"] == "info"
    n_backbone = sum(1 for k in saved["model"] if k.startswith("backbone.") and "num_batches" not in k)
    assert info["pretrained"]["loaded"] >= n_backbone > 0 and not info["pretrained"]["missing"]
    assert not info["pretrained"]["unexpected"]


def test_resume_is_exact(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, tmp_path)
    whole = pretrain(cfg, tmp_path / "whole", steps=12, batch_size=BATCH)
    part = pretrain(cfg, tmp_path / "split", steps=12, batch_size=BATCH, stop_after=5)
    assert not part["completed"] and part["steps"] == 5 and part["path"] is None
    assert not (tmp_path / "split" / "pretrained.pt").exists()
    assert load_checkpoint(tmp_path / "split" / "pretrain_last.pt")["step"] == 5
    rest = pretrain(cfg, tmp_path / "split", steps=12, batch_size=BATCH)
    assert rest["completed"] and rest["loss"] == whole["loss"]
    a = load_checkpoint(tmp_path / "whole" / "pretrained.pt")["model"]
    b = load_checkpoint(tmp_path / "split" / "pretrained.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = load_checkpoint(tmp_path / "whole" / "pretrain_last.pt")
    lb = load_checkpoint(tmp_path / "split" / "pretrain_last.pt")
    for k in la["proj"]:
        assert torch.equal(la["proj"][k], lb["proj"][k]), k
    # The log of the split run marks its resume and holds the same step records.
    recs = _records(tmp_path / "split" / "pretrain.jsonl")
    assert {"kind": "resume", "step": 5}.items() <= next(r for r in recs if r["kind"] == "resume").items()
    # Other settings in the same folder are refused, not silently mixed.
    with pytest.raises(ValueError, match="other settings"):
        pretrain(cfg, tmp_path / "split", steps=12, batch_size=BATCH, temperature=0.5)


def test_streamed_unlabeled_source_is_refused(tiny_data, tmp_path):
    spec = f"list:{tmp_path / 'faces.txt'}"
    cfg = _cfg(tiny_data, tmp_path, data={"unlabeled": [spec]})
    with pytest.raises(ValueError, match="faces.txt"):
        pretrain(cfg, tmp_path / "pt", steps=2, batch_size=BATCH)
    assert not (tmp_path / "pt" / "pretrain_last.pt").exists()


def test_cli_pretrain_prints_the_training_override(tiny_data, tmp_path, capsys):
    import yaml

    from semifer.cli import main

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"data": {"labeled": tiny_data["labeled"], "unlabeled": [tiny_data["unlabeled"]],
                                                 "val": tiny_data["val"], "image_size": 24},
                                        "model": {"backbone": "small_cnn", "backbone_args": {"width": 8}}}))
    out = tmp_path / "cli"
    assert main(["pretrain", "--config", str(cfg_file), "--set", "run.progress=false", "--out", str(out),
                 "--steps", "2", "--batch-size", "16", "--temperature", "0.3"]) == 0
    text = capsys.readouterr().out
    assert f"--set model.pretrained={out / 'pretrained.pt'}" in text
    assert load_checkpoint(out / "pretrained.pt")["pretrain"]["temperature"] == 0.3


def test_non_finite_loss_stops_without_a_checkpoint(tiny_data, tmp_path, monkeypatch):
    import semifer.ssl.pretrain as pt

    monkeypatch.setattr(pt, "nt_xent", lambda z, t: z.sum() * float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite loss between steps 1 and 3"):
        pretrain(_cfg(tiny_data, tmp_path), tmp_path / "pt", steps=3, batch_size=BATCH)
    assert not (tmp_path / "pt" / "pretrain_last.pt").exists()
