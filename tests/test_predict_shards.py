"""``predict`` / ``pseudolabel`` over several processes (torchrun ranks or ``--shard I/N`` jobs).

Two spawned CPU processes with torchrun's environment (RANK, WORLD_SIZE, gloo barrier), and
two independent ``--shard`` jobs plus ``--merge``, must give the one-process files: the same
rows in the same order, probabilities equal to 1e-6 (the last printed digit; batches are
composed differently). Faces come from the ``whole`` detector (the image is the face), so
nothing here needs dlib or OpenCV.
"""
from __future__ import annotations

import csv
import io
import os
import socket
import tarfile

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from semifer.cli import main
from semifer.labels import ABAW_LABELS

pytestmark = pytest.mark.distributed

N_IMAGES = 23    # odd, so the shards differ in size


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """best.pt (weights) and last.pt (student, EMA and dtm_flex state) of an untrained 1-channel 24 px model."""
    from semifer.config import load_config, to_dict
    from semifer.engine.checkpoint import atomic_save
    from semifer.models import build_model
    from semifer.ssl import build_algorithm

    cfg = load_config(base={"data": {"image_size": 24, "channels": 1},
                            "model": {"backbone": "small_cnn", "backbone_args": {"width": 8}},
                            # thresholds inside the untrained model's confidence range (0.14-0.17)
                            "ssl": {"algorithm": "dtm_flex", "tau": 0.16, "tau_min": 0.15, "tau_max": 0.16,
                                    "status_momentum": 0.5, "threshold_warmup": False, "prior_correction": False}})
    torch.manual_seed(0)
    model = build_model(cfg.model, len(ABAW_LABELS), in_chans=1)
    with torch.no_grad():  # larger random weights, so probabilities differ clearly between inputs
        for p in model.parameters():
            if p.dim() > 1:
                p.add_(torch.randn_like(p) * 0.1)
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    algo = build_algorithm(cfg.ssl, 8, torch.arange(1, 9), None)
    algo.policy.update(torch.softmax(torch.randn(64, 8) * 3, 1))  # class-wise statuses that differ
    run = tmp_path_factory.mktemp("run")
    meta = {"step": 7, "config": to_dict(cfg), "labels": list(ABAW_LABELS)}
    atomic_save({"model": ema, **meta}, run / "checkpoints" / "best.pt")
    with torch.no_grad():
        for p in model.parameters():   # the student differs from the EMA teacher
            p.add_(1.0)
    atomic_save({"model": model.state_dict(), "ema": ema, "algorithm": algo.state_dict(), **meta},
                run / "checkpoints" / "last.pt")
    return run


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder of generated images in two subfolders, one corrupt file and one text file."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        sub = root / ("a" if i % 3 else "b")
        sub.mkdir(exist_ok=True)
        arr = (rng.random((30 + i, 28, 3)) * np.linspace(30, 255, N_IMAGES)[i]).astype(np.uint8)
        Image.fromarray(arr).save(sub / f"img{i:03d}.{'png' if i % 2 else 'jpg'}")
    (root / "a" / "corrupt.jpg").write_bytes(b"not a jpeg " * 30)
    (root / "notes.txt").write_text("not media\n")
    return root


def _wds(root, shards=2, per=5):
    """WebDataset tars of generated jpgs (with one undecodable member); returns the brace pattern."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(root / f"{s:03d}.tar", "w") as tf:
            for i in range(per):
                buf = io.BytesIO()
                if (s, i) == (1, 2):
                    buf.write(b"garbage")
                else:
                    Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
                ti = tarfile.TarInfo(f"s{s}_{i:02d}.jpg")
                ti.size = buf.tell()
                buf.seek(0)
                tf.addfile(ti, buf)
    return f"wds:{root}/{{000..{shards - 1:03d}}}.tar"


def _predict_args(run_dir, images, out):
    return ["predict", str(run_dir), str(images), "--out", str(out), "--detector", "whole", "--batch-size", "4",
            "--quiet"]


def _pl_args(run_dir, specs, out):
    args = ["pseudolabel", "--checkpoint", str(run_dir / "checkpoints" / "last.pt"), "--out", str(out),
            "--batch-size", "4", "--quiet"]
    for s in specs:
        args += ["--unlabeled", s]
    return args


def _worker(rank, port, jobs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    for argv in jobs:
        assert main(argv) == 0, argv


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(run_dir, images, tmp_path_factory):
    """Outputs of 1 process, 2 torchrun-like ranks and 2 --shard jobs, for predict and pseudolabel."""
    root = tmp_path_factory.mktemp("runs")
    specs = [f"folder:{images}", _wds(root / "wds")]
    torch.set_num_threads(1)
    jobs = [_predict_args(run_dir, images, root / "p2"), _pl_args(run_dir, specs, root / "l2")]
    mp.start_processes(_worker, args=(_free_port(), jobs), nprocs=2, start_method="spawn")
    assert main(_predict_args(run_dir, images, root / "p1")) == 0
    assert main(_pl_args(run_dir, specs, root / "l1")) == 0
    return root, specs


def _read(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def assert_same_csv(a, b, prob_columns):
    ra, rb = _read(a), _read(b)
    assert ra[0] == rb[0] and len(ra) == len(rb)
    cols = [ra[0].index(c) for c in prob_columns]
    worst = 0.0
    for x, y in zip(ra[1:], rb[1:]):
        assert [v for i, v in enumerate(x) if i not in cols] == [v for i, v in enumerate(y) if i not in cols]
        for i in cols:
            if x[i] or y[i]:
                worst = max(worst, abs(float(x[i]) - float(y[i])))
    assert worst <= 1e-6 + 1e-12, worst
    return ra


def test_two_ranks_predict_equals_one_process(runs):
    root, _ = runs
    rows = assert_same_csv(root / "p1" / "predictions.csv", root / "p2" / "predictions.csv", [*ABAW_LABELS, "score"])
    assert len(rows) == 1 + N_IMAGES                                   # the corrupt file is skipped
    assert [r[0] for r in rows[1:]] == sorted(r[0] for r in rows[1:])  # expand_inputs order: sorted paths
    assert len({tuple(r[9:17]) for r in rows[1:]}) > N_IMAGES // 2      # probabilities really differ per image
    assert sorted(p.name for p in (root / "p2" / "shards").iterdir()) == [
        "predictions.0-of-2.csv", "predictions.0-of-2.json", "predictions.1-of-2.csv", "predictions.1-of-2.json"]


def test_shard_jobs_merge_to_one_process_and_missing_shards_are_named(runs, run_dir, images, tmp_path, capsys):
    root, _ = runs
    out = tmp_path / "p"
    assert main(_predict_args(run_dir, images, out) + ["--shard", "1/3"]) == 0
    assert not (out / "predictions.csv").exists()
    assert main(["predict", "--merge", str(out)]) == 2
    err = capsys.readouterr().err
    assert "2 of 3 shards missing" in err and "predictions.0-of-3.csv" in err and "predictions.2-of-3.csv" in err
    assert "1-of-3" not in err
    for i in (0, 2):
        assert main(_predict_args(run_dir, images, out) + ["--shard", f"{i}/3"]) == 0
    assert main(_predict_args(run_dir, images, out) + ["--shard", "2/3"]) == 0   # rerun: shard is complete
    assert "shard 2/3 already complete, not redone" in capsys.readouterr().out
    assert main(["predict", "--merge", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{N_IMAGES + 1} sources, {N_IMAGES} frames" in printed and "skipped 2" in printed
    assert_same_csv(root / "p1" / "predictions.csv", out / "predictions.csv", [*ABAW_LABELS, "score"])


def test_a_shard_of_other_settings_is_redone_and_mixed_shards_are_refused(run_dir, images, tmp_path, capsys):
    out = tmp_path / "p"
    for i in (0, 1):
        assert main(_predict_args(run_dir, images, out) + ["--shard", f"{i}/2"]) == 0
    (out / "shards" / "predictions.1-of-2.json").write_text(
        (out / "shards" / "predictions.1-of-2.json").read_text().replace('"fingerprint": "', '"fingerprint": "x'))
    assert main(["predict", "--merge", str(out)]) == 2
    assert "shards 1/2 were made with other settings" in capsys.readouterr().err
    assert main(_predict_args(run_dir, images, out) + ["--shard", "1/2"]) == 0
    assert "already complete" not in capsys.readouterr().out
    assert main(["predict", "--merge", str(out)]) == 0


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 30])
def test_shard_assignment_covers_every_input_once(n, images, tmp_path):
    from semifer.data.decode import SkipCounter
    from semifer.data.unlabeled import ImageFolderSource, WebDatasetSource
    from semifer.infer.pseudolabel import _items
    from semifer.infer.shards import Shard

    assert sorted(i for k in range(n) for i in Shard(k, n).indices(N_IMAGES)) == list(range(N_IMAGES))
    pattern = _wds(tmp_path / "wds", shards=3, per=4)[len("wds:"):]
    sources = [("f", ImageFolderSource(images)), ("w", WebDatasetSource(pattern))]
    keys = [k for s in range(n) for k, *_ in _items(sources, Shard(s, n), SkipCounter())]
    whole = [k for k, *_ in _items(sources, Shard(0, 1), SkipCounter())]
    assert len(whole) == N_IMAGES + 1 + 12 and sorted(keys) == sorted(whole) and whole == sorted(whole)


def test_two_ranks_pseudolabel_equals_one_process_with_bad_samples_counted(runs, capsys):
    import json

    root, specs = runs
    rows = assert_same_csv(root / "l1" / "pseudolabels.csv", root / "l2" / "pseudolabels.csv",
                           [*ABAW_LABELS, "confidence"])
    assert rows[0] == ["source", "key", *ABAW_LABELS, "label", "confidence"]
    assert len(rows) == 1 + N_IMAGES + 9                     # 10 tar members, one undecodable
    assert [r[0] for r in rows[1:]] == [specs[0]] * N_IMAGES + [specs[1]] * 9
    assert rows[1][1] == "a/img001.png" and rows[-1][1].endswith("001.tar:s1_04")
    for name in ("l1", "l2"):
        summary = json.loads((root / name / "pseudolabels.json").read_text())
        assert summary["skipped"]["counts"] == {"not an image": 2}, summary
        assert summary["samples"] == summary["rows"] == N_IMAGES + 9
        assert summary["weights"].startswith("ema of last.pt")


def test_pseudolabel_thresholds_from_the_checkpoint_and_shard_merge(run_dir, images, tmp_path, capsys):
    import json

    from semifer.engine.checkpoint import load_checkpoint
    from semifer.infer.pseudolabel import class_thresholds

    specs = [f"folder:{images}", _wds(tmp_path / "wds")]
    assert main(_pl_args(run_dir, specs, tmp_path / "all")) == 0
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    thr, where = class_thresholds("dtm", ckpt, run_dir / "checkpoints" / "last.pt")
    assert thr.shape == (8,) and len(set(np.round(thr, 6))) > 1 and "dtm_flex state of last.pt" in where
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")     # weights only: last.pt beside it is used
    assert np.allclose(class_thresholds("dtm", best, run_dir / "checkpoints" / "best.pt")[0], thr)
    out = tmp_path / "t"
    for i in (0, 1):
        assert main(_pl_args(run_dir, specs, out) + ["--threshold", "dtm", "--shard", f"{i}/2"]) == 0
    assert main(["pseudolabel", "--merge", str(out)]) == 0
    all_rows = _read(tmp_path / "all" / "pseudolabels.csv")[1:]
    kept = [r for r in all_rows if float(r[-1]) >= thr[ABAW_LABELS.index(r[-2])]]
    assert 0 < len(kept) < len(all_rows)
    got = _read(out / "pseudolabels.csv")[1:]
    assert [r[:2] for r in got] == [r[:2] for r in kept]
    assert f"{len(all_rows) - len(kept)} below threshold" in capsys.readouterr().out
    summary = json.loads((out / "pseudolabels.json").read_text())
    assert summary["probabilities"] == "softmax" and summary["calibration"] is None  # dtm_flex: no calibration
    assert main(_pl_args(run_dir, specs, tmp_path / "u") + ["--threshold", "1.5"]) == 2


def test_load_model_takes_the_ema_teacher_of_a_training_state(run_dir):
    """last.pt holds student and EMA: loading it gives the EMA weights, the model best.pt stores."""
    from semifer.eval.report import load_model

    from_last, _, _ = load_model(run_dir / "checkpoints" / "last.pt")
    from_best, _, _ = load_model(run_dir / "checkpoints" / "best.pt")
    for (name, a), b in zip(from_last.state_dict().items(), from_best.state_dict().values()):
        assert torch.equal(a, b), name


def _teacher_probs(checkpoint, specs, batch_size=4):
    """(sample keys, softmax probabilities) of the checkpoint's teacher, batched as pseudolabel batches them."""
    from semifer.data.decode import SkipCounter
    from semifer.infer.pseudolabel import _batches, _items, _open, load_teacher
    from semifer.infer.shards import Shard

    model, cfg, *_ = load_teacher(checkpoint)
    sources = [(spec, _open(spec, cfg)) for spec in specs]
    names, probs = [], []
    for _, _, keys, x in _batches(_items(sources, Shard(), SkipCounter()), cfg.data.image_size, batch_size,
                                  cfg.data.channels, None, SkipCounter()):
        with torch.inference_mode():
            probs.append(torch.softmax(model(torch.from_numpy(x).float().div_(255.0)).float(), 1))
        names += keys
    return names, torch.cat(probs)


def test_pseudolabel_with_a_dtm_checkpoint_writes_its_calibrated_mask(run_dir, images, tmp_path, capsys):
    """The precision-target DTM thresholds calibrated probabilities: rows = policy.mask on the same probabilities."""
    import json

    from semifer.config import TrainConfig, from_dict, to_dict
    from semifer.engine.checkpoint import atomic_save, load_checkpoint
    from semifer.ssl import build_algorithm

    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    cfg = from_dict(TrainConfig, last["config"])
    cfg.ssl.algorithm = "dtm"
    algo = build_algorithm(cfg.ssl, 8, torch.arange(1, 9), None)
    pol = algo.policy
    ckpt = tmp_path / "dtm_run" / "checkpoints" / "last.pt"
    specs = [f"folder:{images}", _wds(tmp_path / "wds")]
    atomic_save({**last, "config": to_dict(cfg), "algorithm": algo.state_dict()}, ckpt)
    names, probs = _teacher_probs(ckpt, specs)
    # The untrained teacher's probabilities lie in 0.14-0.16 and it predicts two classes: a sharp
    # temperature spreads them and biases that centre each class's mean calibrated logit move the
    # argmax, so calibrated labels spread over more classes and differ from the raw ones.
    pol.temperature.fill_(0.02)
    pol.bias.copy_(-(probs.log() / 0.02).mean(0))
    q = pol.calibrated(probs)
    conf, label = q.max(1)
    assert (label != probs.argmax(1)).any()                   # the calibration changes some labels
    # Thresholds by hand: halfway between the middle calibrated confidences of each predicted class
    # (no sample on a threshold), the most predicted class closed (threshold 1: nothing of it is kept).
    counts = torch.bincount(label, minlength=8)
    thr = torch.ones(8)
    for c in torch.nonzero(counts).flatten().tolist():
        v = conf[label == c].sort().values
        k = len(v) // 2
        thr[c] = (v[k - 1] + v[k]) / 2 if k > 0 else v[0] - 1e-3
    closed = int(counts.argmax())
    thr[closed] = 1.0
    pol.thr.copy_(thr)
    atomic_save({**last, "config": to_dict(cfg), "algorithm": algo.state_dict()}, ckpt)
    mask, pseudo = pol.mask(probs)
    assert 0 < mask.sum() < len(mask) and torch.equal(pseudo, label)

    out = tmp_path / "pl"
    args = ["pseudolabel", "--checkpoint", str(ckpt), "--out", str(out), "--batch-size", "4", "--quiet",
            "--threshold", "dtm"] + [a for s in specs for a in ("--unlabeled", s)]
    assert main(args) == 0
    assert "(calibrated probabilities)" in capsys.readouterr().out
    rows = _read(out / "pseudolabels.csv")[1:]
    kept = [i for i in range(len(names)) if mask[i]]
    assert [r[1] for r in rows] == [names[i] for i in kept]   # exactly the rows the policy's mask accepts
    for r, i in zip(rows, kept):
        assert r[-2] == ABAW_LABELS[int(label[i])]             # the calibrated argmax
        assert abs(float(r[-1]) - float(conf[i])) <= 1e-6      # its calibrated confidence
        assert np.allclose([float(v) for v in r[2:10]], q[i].numpy(), atol=1e-6)
    assert ABAW_LABELS[closed] not in {r[-2] for r in rows}
    summary = json.loads((out / "pseudolabels.json").read_text())
    assert summary["probabilities"] == "calibrated" and summary["below_threshold"] == len(names) - len(kept)
    assert summary["calibration"]["temperature"] == pytest.approx(0.02)
    assert summary["calibration"]["bias"] == pytest.approx(pol.bias.tolist(), abs=1e-5)
    assert summary["thresholds"] == pytest.approx(thr.tolist(), abs=1e-6)
    # Sharded jobs and their merge keep the calibration record.
    sharded = tmp_path / "pl2"
    for i in (0, 1):
        assert main(args[:4] + [str(sharded)] + args[5:] + ["--shard", f"{i}/2"]) == 0
    assert main(["pseudolabel", "--merge", str(sharded)]) == 0
    assert_same_csv(out / "pseudolabels.csv", sharded / "pseudolabels.csv", [*ABAW_LABELS, "confidence"])
    assert json.loads((sharded / "pseudolabels.json").read_text())["probabilities"] == "calibrated"
