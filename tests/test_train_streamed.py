"""Training with streamed unlabeled sources (decoded in loader workers): runs and resumes exactly."""
import tarfile

import pytest
import torch
from PIL import Image

import semifer
from semifer.engine.checkpoint import load_checkpoint
from tests.conftest import stripes, tiny_config


@pytest.fixture(scope="module")
def unlabeled_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed")
    images, _ = stripes(12, seed=7)
    folder = root / "faces"
    folder.mkdir()
    for i, a in enumerate(images):
        Image.fromarray(a).save(folder / f"{i:04d}.png")
    shard = root / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for p in sorted(folder.iterdir()):
            tar.add(p, arcname=p.name)
    return {"folder": f"stream:folder:{folder}", "wds": f"wds:{shard}"}


# dtm_flex keeps FlexMatch's per-sample status where the source is indexed; the precision-target
# dtm needs no index (calibrated every 2 steps from step 1 on, so resuming crosses a calibration).
# dtm_rounds refuses streamed sources (tests/test_dtm.py).
@pytest.mark.parametrize("kind, algorithm, mode", [("folder", "dtm_flex", "indexed"), ("wds", "dtm_flex", "streamed"),
                                                   ("wds", "dtm", None)])
def test_streamed_unlabeled_trains_and_resumes_exactly(tiny_data, unlabeled_dirs, tmp_path, kind, algorithm, mode):
    dtm = {"warmup_steps": 1, "calib_every": 2, "target_precision": 0.2, "precision_floor": 0.0, "hist_momentum": 0.5}
    kw = dict(algorithm=algorithm, steps=6, data={"unlabeled": [unlabeled_dirs[kind]], "num_workers": 1},
              ssl=dtm if algorithm == "dtm" else {}, run={"checkpoint_every": 3, "eval_every": 3})
    full = semifer.train(tiny_config(tiny_data, tmp_path / "full", **kw))
    assert full.completed
    cfg = tiny_config(tiny_data, tmp_path / "part", **kw)
    semifer.train(cfg, stop_after=4)
    semifer.train(cfg)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    for part in ("model", "ema", "algorithm"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    status_keys = {k.split(".")[-1] for k in a["algorithm"]}
    assert ("selected" in status_keys) == (mode == "indexed")
    assert ("status" in status_keys) == (mode == "streamed")
    if algorithm == "dtm":
        assert int(a["algorithm"]["policy.calibrations"]) == 3          # steps 1, 3, 5
        assert (a["algorithm"]["policy.thr"] < 1).any()                  # some class opened


def test_streamed_and_in_memory_sources_cannot_mix_yet(tiny_data, unlabeled_dirs, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "r", algorithm="fixmatch", steps=2,
                      data={"unlabeled": [unlabeled_dirs["wds"], tiny_data["unlabeled"]]})
    with pytest.raises(ValueError, match="cannot be mixed"):
        semifer.train(cfg)


def test_streamed_sources_mix_with_weights(tiny_data, unlabeled_dirs, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "r", algorithm="dtm", steps=2,
                      data={"unlabeled": [unlabeled_dirs["wds"], unlabeled_dirs["folder"]],
                            "unlabeled_weights": [3.0, 1.0], "num_workers": 1})
    assert semifer.train(cfg).completed
    bad = tiny_config(tiny_data, tmp_path / "bad", algorithm="dtm", steps=2,
                      data={"unlabeled": [unlabeled_dirs["wds"]], "unlabeled_weights": [1.0, 2.0]})
    with pytest.raises(ValueError, match="one positive weight"):
        semifer.train(bad)
