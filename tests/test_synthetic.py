"""Tests of the synthetic demo faces (semifer.data.synthetic)."""
from __future__ import annotations

import pytest
import torch

from semifer.data.synthetic import (
    DEFAULT_UNLABELED_PRIOR,
    SyntheticSplit,
    make_demo_splits,
    render_faces,
    save_grid,
)
from semifer.labels import ABAW_LABELS, NUM_CLASSES

SMALL = dict(labeled_per_class=5, unlabeled=300, test_per_class=6, val_per_class=4)


@pytest.fixture(scope="module")
def small_splits() -> dict[str, SyntheticSplit]:
    return make_demo_splits(seed=0, **SMALL)


def test_shapes_and_dtypes(small_splits):
    assert set(small_splits) == {"labeled", "unlabeled", "val", "test"}
    expected_n = {"labeled": 5 * NUM_CLASSES, "unlabeled": 300, "val": 4 * NUM_CLASSES, "test": 6 * NUM_CLASSES}
    for name, sp in small_splits.items():
        n = expected_n[name]
        assert sp.images.shape == (n, 3, 48, 48), name
        assert sp.images.dtype == torch.uint8
        for t in (sp.labels, sp.true_labels, sp.identities):
            assert t.shape == (n,) and t.dtype == torch.int64
        assert 0 <= int(sp.true_labels.min()) and int(sp.true_labels.max()) < NUM_CLASSES
        # Real images, not blank: a reasonable spread of intensities.
        assert sp.images.float().std() > 20


def test_size_parameter():
    sp = render_faces(4, torch.tensor([0, 4, 6, 7]), size=64, seed=3)
    assert sp.images.shape == (4, 3, 64, 64)
    assert sp.images.dtype == torch.uint8


def test_deterministic_by_seed(small_splits):
    again = make_demo_splits(seed=0, **SMALL)
    other = make_demo_splits(seed=1, **SMALL)
    for name in small_splits:
        a, b, c = small_splits[name], again[name], other[name]
        assert torch.equal(a.images, b.images), name
        assert torch.equal(a.labels, b.labels) and torch.equal(a.true_labels, b.true_labels)
        assert torch.equal(a.identities, b.identities)
        assert not torch.equal(a.images, c.images), name


def test_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    render_faces(8, None, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_per_class_counts(small_splits):
    for name, k in (("labeled", 5), ("val", 4), ("test", 6)):
        sp = small_splits[name]
        assert torch.bincount(sp.labels, minlength=NUM_CLASSES).tolist() == [k] * NUM_CLASSES, name
        assert torch.equal(sp.labels, sp.true_labels)


def test_labeled_per_class_limit():
    with pytest.raises(ValueError):
        make_demo_splits(labeled_per_class=31, unlabeled=8, test_per_class=1)
    with pytest.raises(ValueError):
        make_demo_splits(labeled_per_class=0, unlabeled=8, test_per_class=1)


def test_unlabeled_split_follows_skewed_prior():
    sp = make_demo_splits(seed=2, labeled_per_class=1, unlabeled=2000, test_per_class=1)["unlabeled"]
    assert (sp.labels == -1).all()
    counts = torch.bincount(sp.true_labels, minlength=NUM_CLASSES).float()
    freq = counts / counts.sum()
    prior = torch.tensor(DEFAULT_UNLABELED_PRIOR)
    assert int(counts.argmax()) == ABAW_LABELS.index("Neutral")
    assert freq[ABAW_LABELS.index("Happiness")] > freq[[1, 2, 3, 5, 6, 7]].max()
    assert (freq - prior).abs().max() < 0.04
    assert (counts > 0).all()


def test_custom_unlabeled_prior():
    prior = [0, 0, 0, 0, 0, 0, 1.0, 0]
    sp = make_demo_splits(seed=0, labeled_per_class=1, unlabeled=50, test_per_class=1, unlabeled_prior=prior)
    assert (sp["unlabeled"].true_labels == ABAW_LABELS.index("Surprise")).all()


def test_identities_disjoint_across_splits(small_splits):
    ids = {name: set(sp.identities.tolist()) for name, sp in small_splits.items()}
    names = sorted(ids)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not ids[a] & ids[b], (a, b)
    # The labeled split covers few identities; the unlabeled split many.
    assert len(ids["labeled"]) <= 12
    assert len(ids["unlabeled"]) > 3 * len(ids["labeled"])


def test_classes_visually_distinguishable():
    # Same seed => same identities, poses, lighting, noise and AU jitter: the
    # paired images differ only by the class prototype. (Comparing class-mean
    # images is too noisy here: pose jitter smears the small features.)
    n = 48
    img = {
        name: render_faces(n, torch.full((n,), ABAW_LABELS.index(name)), seed=3, identities_count=16).images.float()
        for name in ("Neutral", "Anger", "Happiness", "Surprise")
    }
    mouth = (slice(None), slice(None), slice(30, 42), slice(15, 33))
    brows = (slice(None), slice(None), slice(8, 21), slice(8, 40))

    def change(name, region):   # mean absolute change vs Neutral, in grey levels
        return float((img[name] - img["Neutral"])[region].abs().mean())

    # Each expression changes the face, and where its action units act.
    assert change("Happiness", mouth) > 3.0
    assert change("Happiness", mouth) > 3 * change("Happiness", brows)
    assert change("Anger", brows) > 2 * change("Anger", mouth)
    assert change("Surprise", brows) > 2 * change("Happiness", brows)
    assert change("Surprise", mouth) > change("Happiness", mouth)


def test_save_grid(tmp_path, small_splits):
    from PIL import Image

    path = save_grid(small_splits["test"], tmp_path / "grid.png", n_per_class=4)
    img = Image.open(path)
    assert img.mode == "RGB"
    assert img.height >= NUM_CLASSES * 48 and img.width >= 4 * 48
