"""Dataset formats, registered by name: ``FORMAT:PATH`` -> :class:`ImageSet`.

A format loader receives the part after the colon and the data config; it maps
its own class names to the ABAW order (``semifer.labels``) and never augments.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from functools import lru_cache

from semifer.config import DataConfig, to_dict
from semifer.data.imageset import ImageSet, conform
from semifer.registry import FORMATS


def parse_source(spec: str) -> tuple[str, str, dict[str, str]]:
    """Split ``'FORMAT:PATH[?key=value&...]'``; the format must be registered.

    Options after ``?`` go to the reader as keyword arguments (strings), e.g.
    ``fer2013:/data/fer2013.csv?split=PublicTest``.
    """
    if ":" not in spec:
        raise ValueError(f"data source {spec!r} must look like FORMAT:PATH (formats: {', '.join(FORMATS.names())})")
    fmt, rest = spec.split(":", 1)
    FORMATS.get(fmt)
    path, _, query = rest.partition("?")
    options: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise ValueError(f"data source {spec!r}: option {part!r} must look like key=value")
        options[key] = value
    return fmt, path, options


_CACHE: OrderedDict[str, ImageSet] = OrderedDict()
_CACHE_SIZE = 6


def load_source(spec: str, cfg: DataConfig) -> ImageSet:
    """Load one ``FORMAT:PATH[?options]`` source at the configured size and channel count.

    Decoded sets are kept in a small in-process LRU cache keyed by the spec and the data
    config, so a script training several algorithms on the same data decodes it once.
    """
    key = json.dumps([spec, to_dict(cfg)], sort_keys=True, default=str)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    data = _load_uncached(spec, cfg)
    _CACHE[key] = data
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return data


def _load_uncached(spec: str, cfg: DataConfig) -> ImageSet:
    fmt, path, options = parse_source(spec)
    try:
        data = FORMATS.get(fmt)(path, cfg, **options)
    except TypeError as e:
        raise ValueError(f"{spec}: unsupported option for format {fmt!r} ({e})") from None
    except UnicodeDecodeError as e:  # an annotation file in another encoding: say which source, not a traceback
        raise ValueError(f"{spec}: an annotation file is not UTF-8 text ({e})") from None
    return ImageSet(conform(data.images, cfg.image_size, cfg.channels), data.labels, data.true_labels,
                    name=spec, skipped=dict(data.skipped), frames=data.frames)


@lru_cache(maxsize=4)
def _synthetic_splits(seed: int, size: int, labeled_per_class: int, unlabeled: int, test_per_class: int,
                      val_per_class: int) -> dict:
    from semifer.data.synthetic import make_demo_splits

    return make_demo_splits(seed=seed, size=size, labeled_per_class=labeled_per_class,
                            unlabeled=unlabeled, test_per_class=test_per_class, val_per_class=val_per_class)


@FORMATS.register("synthetic")
def synthetic(path: str, cfg: DataConfig) -> ImageSet:
    """Embedded procedurally drawn demo faces; PATH is the split: labeled, unlabeled, val or test."""
    splits = _synthetic_splits(cfg.synthetic_seed, cfg.image_size, cfg.synthetic_labeled_per_class,
                               cfg.synthetic_unlabeled, cfg.synthetic_test_per_class, cfg.synthetic_val_per_class)
    if path not in splits:
        raise ValueError(f"synthetic split {path!r} does not exist; choose one of {sorted(splits)}")
    s = splits[path]
    return ImageSet(s.images, s.labels, s.true_labels, name=f"synthetic:{path}")


@FORMATS.register("npz")
def npz(path: str, cfg: DataConfig) -> ImageSet:
    """NumPy archive: ``images`` uint8 (N,H,W[,C]) or (N,C,H,W); ``labels`` (N,) ints; ``classes`` names."""
    import numpy as np
    import torch

    from semifer.labels import label_index

    import zipfile

    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z:
                raise ValueError(f"{path}: no 'images' array")
            images = z["images"]
            labels = z["labels"] if "labels" in z else np.full(len(images), -1)
            classes = [str(c) for c in z["classes"]] if "classes" in z else None
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not a readable .npz archive ({e})") from None
    if images.dtype != np.uint8:
        raise ValueError(f"{path}: images must be uint8, got {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    if images.ndim != 4:
        raise ValueError(f"{path}: images must have 3 or 4 dimensions, got shape {images.shape}")
    labels = np.asarray(labels).astype(np.int64)
    if classes is not None:
        # Dataset-local class ids -> ABAW order by name; -1 stays unlabeled.
        lut = np.array([label_index(c) for c in classes], dtype=np.int64)
        if labels.size and labels.max() >= len(lut):
            raise ValueError(f"{path}: label {labels.max()} has no entry in 'classes'")
        labels = np.where(labels >= 0, lut[np.clip(labels, 0, None)], -1)
    elif labels.size and labels.max() >= 8:
        raise ValueError(f"{path}: labels must be ABAW indices 0..7 (or give 'classes')")
    return ImageSet(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels), name=f"npz:{path}")
