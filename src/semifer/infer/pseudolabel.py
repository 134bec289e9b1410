"""``semifer pseudolabel``: a trained model's labels for unlabeled face crops, over any number of processes.

The unlabeled images are taken as the crops they are (as training decodes them: no detection,
no alignment). Sources are the streamed kinds of :mod:`semifer.data.unlabeled` (``folder:``,
``list:``, ``wds:``, ``recordio:``) or any in-memory format (``npz:`` ...). Output
``OUT/pseudolabels.csv``: one row per decodable sample, ``source, key, <8 ABAW probabilities>,
label, confidence``, in source order, then sample order (folder/list: sorted relative path;
recordio: .idx order; wds: tar order, then tar member order). Undecodable samples are skipped
and counted. ``--threshold X`` (or ``dtm``: the class-wise thresholds the checkpoint's algorithm
state gives) keeps the rows whose confidence reaches their class's threshold. Where that state's
policy calibrates the teacher (DTM: ``semifer.ssl.dtm``, thresholds on probabilities calibrated by a
temperature and per-class biases), the rows hold the *calibrated* probabilities, the label is their
argmax and a row is kept exactly when the policy's own ``mask`` accepts it (a closed class, threshold
1, keeps nothing); ``pseudolabels.json`` says which (``probabilities``, ``calibration``).

Sharding (:mod:`semifer.infer.shards`): sample ``i`` of an indexed source goes to shard
``i % N``; WebDataset tars go whole to shards ``t % N`` (with fewer tars than shards, the
shards sharing a tar take its samples by position, as the training stream does), so each
shard reads only its own bytes. ``OUT/pseudolabels.json`` records counts, skips, weights and
thresholds.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from semifer.data.decode import SkipCounter, decode_image
from semifer.infer.shards import (CsvOut, Shard, completed_shard, fingerprint, merge_shards, shard_files,
                                  skips_from_dicts, skips_to_dict, wait_for_ranks)
from semifer.labels import ABAW_LABELS, NUM_CLASSES

PL_COLUMNS = ["source", "key", *ABAW_LABELS, "label", "confidence"]
STEM = "pseudolabels"
_COUNTS = ("samples", "rows", "below_threshold")


@dataclass
class PseudoLabelReport:
    """Counts of one ``pseudolabel`` call (a shard's, or the merged run's)."""

    csv: Path
    samples: int = 0           # decoded and classified
    rows: int = 0              # written (confidence >= threshold)
    below_threshold: int = 0
    seconds: float = 0.0
    skips: SkipCounter = field(default_factory=SkipCounter)
    info: dict = field(default_factory=dict)   # weights, thresholds, sources
    shard: str = ""
    reused: bool = False

    def summary(self) -> str:
        if self.reused:
            return f"{self.shard} already complete, not redone ({self.rows} rows, {self.skips.summary()}): {self.csv}"
        thr = f", {self.below_threshold} below threshold" if self.info.get("thresholds") is not None else ""
        if self.info.get("probabilities") == "calibrated":
            thr += " (calibrated probabilities)"
        rate = self.samples / self.seconds if self.seconds > 0 else 0.0
        return (f"{self.samples} samples -> {self.rows} rows{thr} in {self.seconds:.1f} s ({rate:.1f} samples/s, "
                f"weights: {self.info.get('weights', '?')}); {self.skips.summary()}; wrote {self.csv}"
                + (f" ({self.shard})" if self.shard else ""))


# --------------------------------------------------------------------------- model and thresholds
def load_teacher(checkpoint: Path | str, device: str = "cpu"):
    """(model in eval mode with the EMA weights where the checkpoint has them, config, checkpoint, path, which)."""
    from semifer.eval.report import load_model, resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    model, cfg, ckpt = load_model(path, device)
    which = "model"
    if "ema" in ckpt:  # last.pt; best.pt's "model" already is the EMA teacher's
        model.load_state_dict(ckpt["ema"])
        which = "ema"
    return model.eval(), cfg, ckpt, path, f"{which} of {path.name} (step {ckpt.get('step')})"


def class_thresholds(threshold: str | float | None, ckpt: dict, path: Path) -> tuple[np.ndarray | None, str]:
    """Per-class thresholds (8,) from ``--threshold``: a number, or ``dtm`` (the checkpoint's algorithm state)."""
    _, thr, where = threshold_policy(threshold, ckpt, path)
    return thr, where


def threshold_policy(threshold: str | float | None, ckpt: dict, path: Path):
    """``(policy or None, per-class thresholds (8,) or None, where they came from)`` for ``--threshold``.

    ``policy`` is the checkpoint's threshold policy (``--threshold dtm``), on the CPU, else None.
    """
    if threshold is None:
        return None, None, "none"
    if str(threshold).lower() != "dtm":
        try:
            t = float(threshold)
        except ValueError:
            raise ValueError(f"--threshold wants a number in [0, 1] or dtm, got {threshold!r}") from None
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"--threshold must lie in [0, 1], got {t}")
        return None, np.full(NUM_CLASSES, t), f"{t:g}"
    state, where = ckpt.get("algorithm"), path.name
    if state is None and path.name != "last.pt" and (path.parent / "last.pt").is_file():
        # best.pt keeps weights only; the training state beside it has the threshold buffers
        from semifer.engine.checkpoint import load_checkpoint

        last = load_checkpoint(path.parent / "last.pt")
        state, where = last.get("algorithm"), f"last.pt (step {last.get('step')})"
    if state is None:
        raise ValueError(f"--threshold dtm: {path} holds no algorithm state and no last.pt is beside it; "
                         "give a number instead")
    from semifer.config import TrainConfig, from_dict
    from semifer.ssl import build_algorithm

    cfg = from_dict(TrainConfig, ckpt["config"])
    # The unlabeled set's size, where the state has per-sample buffers: FlexMatch-style indexed
    # status, dtm_rounds' accepted faces (which needs it: it refuses to be built without one).
    per_sample = state.get("policy.status.selected", state.get("accepted"))
    algo = build_algorithm(cfg.ssl, NUM_CLASSES, state["labeled_counts"],
                           None if per_sample is None else int(per_sample.numel()))
    if algo.policy is None:
        raise ValueError(f"--threshold dtm: algorithm {cfg.ssl.algorithm!r} keeps no thresholds; give a number")
    algo.load_state_dict(state)
    policy = algo.policy.cpu().eval()
    return policy, policy.thresholds().double().numpy(), f"{cfg.ssl.algorithm} state of {where}"


def calibrating(policy) -> bool:
    """True for a policy whose thresholds apply to calibrated probabilities (DTM's ``calibrated``)."""
    return policy is not None and callable(getattr(policy, "calibrated", None))


# --------------------------------------------------------------------------- samples of one shard
def _open(spec: str, cfg):
    """A streamed source (folder/list/wds/recordio) or a decoded in-memory ImageSet."""
    from semifer.data.unlabeled import open_unlabeled
    from semifer.registry import UNLABELED_SOURCES

    kind = spec[len("stream:"):] if spec.startswith("stream:") else spec
    if kind.partition(":")[0].strip().lower() in UNLABELED_SOURCES.names():
        return open_unlabeled(spec)
    from semifer.data.formats import load_source

    return load_source(spec, cfg.data)


def _size(src) -> int:
    shards = getattr(src, "shards", None)
    return len(shards) if shards is not None else len(src)


def _items(sources: list[tuple[str, object]], shard: Shard, skips: SkipCounter) -> Iterator[tuple]:
    """``(order key, source spec, sample key, payload, reason)`` of this shard's samples, in merge order.

    ``payload``: bytes or a path to decode, a decoded uint8 (C, S, S) array, or None (``reason`` says why).
    """
    from semifer.data.unlabeled import WebDatasetSource

    for s, (spec, src) in enumerate(sources):
        if shard.index == 0:  # found while opening the source: counted once
            for reason, n in getattr(src, "skipped", {}).items():
                skips.counts[reason] += n
        if isinstance(src, WebDatasetSource):
            S, C, c = len(src.shards), shard.count, shard.index
            if S >= C:
                parts = [(t, None, 1) for t in range(c, S, C)]
            else:  # as WebDatasetSource.epoch_samples: the consumers on one tar split it by position
                parts = [(c % S, c // S, len(range(c % S, C, S)))]
            for t, sub, m in parts:
                for pos, (where, payload, reason) in enumerate(src.read_shard(src.shards[t])):
                    if sub is None or pos % m == sub:
                        yield (s, t, pos), spec, where, payload, reason
        elif hasattr(src, "read"):  # indexed: folder, list, recordio
            keys = getattr(src, "keys", None)
            for i in shard.indices(len(src)):
                where, payload, reason = src.read(i)
                key = src.paths[i] if hasattr(src, "paths") else str(int(keys[i])) if keys is not None else where
                yield (s, i, 0), spec, key, payload, reason
        elif hasattr(src, "images"):  # in-memory ImageSet, already decoded at the model's size
            for i in shard.indices(len(src)):
                yield (s, i, 0), spec, str(i), src.images[i].numpy(), None
        else:
            raise ValueError(f"{spec}: cannot pseudo-label a source of type {type(src).__name__}")


def _batches(items: Iterator[tuple], size: int, batch_size: int, channels: int, pool, skips: SkipCounter):
    """Decoded batches ``(keys, specs, sample keys, uint8 (B, C, S, S))``; bad samples counted."""
    def decode(item):
        payload = item[3]
        if payload is None:
            return None, item[4] or "unknown"
        if isinstance(payload, np.ndarray):
            return payload, None
        return decode_image(payload, size, channels)

    def emit(chunk):
        decoded = list(pool.map(decode, chunk)) if pool is not None else [decode(it) for it in chunk]
        good = []
        for it, (arr, reason) in zip(chunk, decoded):
            if arr is None:
                skips.add(reason or "unknown", it[2])
            else:
                good.append((it, arr))
        if good:
            return ([it[0] for it, _ in good], [it[1] for it, _ in good], [it[2] for it, _ in good],
                    np.stack([arr for _, arr in good]))
        return None

    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == batch_size:
            b = emit(chunk)
            chunk = []
            if b is not None:
                yield b
    if chunk:
        b = emit(chunk)
        if b is not None:
            yield b


# --------------------------------------------------------------------------- runs
def pseudolabel(checkpoint: Path | str, unlabeled: list[str], out: Path | str, batch_size: int = 256,
                threshold: str | float | None = None, device: str = "cpu", workers: int = 2,
                shard: Shard | None = None, progress: bool = True) -> PseudoLabelReport:
    """Label every sample of ``unlabeled``; write ``out/pseudolabels.csv`` (sharded: see the module doc)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shard = shard or Shard()
    t0 = time.perf_counter()
    model, cfg, ckpt, path, weights = load_teacher(checkpoint, device)
    policy, thr, thr_from = threshold_policy(threshold, ckpt, path)
    calibrated = calibrating(policy)
    from semifer.faces.prepare import check_frame

    for spec in unlabeled:
        check_frame(spec, cfg.data.face_frame, f"the teacher's data.face_frame ({path})")
    sources = [(spec, _open(spec, cfg)) for spec in unlabeled]
    stat = path.stat()
    info = {"checkpoint": str(path), "weights": weights, "unlabeled": list(unlabeled),
            "thresholds": None if thr is None else [round(float(t), 6) for t in thr], "thresholds_from": thr_from,
            "probabilities": "calibrated" if calibrated else "softmax",
            "calibration": _calibration_info(policy, thr_from) if calibrated else None}
    fp = fingerprint({**info, "file": (stat.st_size, stat.st_mtime_ns), "sizes": [_size(s) for _, s in sources]})
    if shard.count == 1:
        sink, meta_path = CsvOut(out / f"{STEM}.csv", PL_COLUMNS), None
        report = PseudoLabelReport(sink.path, info=info)
    else:
        csv_path, meta_path = shard_files(out, STEM, shard)
        done = completed_shard(out, STEM, shard, fp)
        if done is not None:
            report = PseudoLabelReport(csv_path, **{k: done[k] for k in _COUNTS}, seconds=done["seconds"],
                                       skips=skips_from_dicts([done["skips"]]), info=info, shard=f"shard {shard}",
                                       reused=True)
            if progress:
                print(f"  shard {shard}: already complete ({csv_path}), not redone", flush=True)
        else:
            sink = CsvOut(csv_path, PL_COLUMNS, keys=3)
            report = PseudoLabelReport(csv_path, info=info, shard=f"shard {shard}")
    if not report.reused:
        try:
            _run(model, cfg, sources, shard, sink, report, thr, batch_size, device, workers, progress,
                 policy if calibrated else None)
        except BaseException:
            sink.abort()
            raise
        report.seconds = time.perf_counter() - t0
        meta = {"fingerprint": fp, "shard": str(shard), "order_keys": 3, "seconds": report.seconds,
                **{k: getattr(report, k) for k in _COUNTS}, "skips": skips_to_dict(report.skips), **info}
        sink.commit(meta, meta_path)
        if shard.count == 1:
            _write_summary(out, report)
    if shard.launched:
        wait_for_ranks(shard)
        if shard.index == 0:
            report = merge_pseudolabels(out, count=shard.count, launched=True)
            report.seconds = time.perf_counter() - t0
    return report


def _calibration_info(policy, where: str) -> dict:
    """What the rows' calibration was: temperature and per-class biases, and their source."""
    return {"from": where, "temperature": round(float(policy.temperature.reshape(-1)[0]), 6),
            "bias": [round(float(b), 6) for b in policy.bias.reshape(-1)]}


def _label(probs: torch.Tensor, thr, policy) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(probabilities written, label, confidence, keep)`` of a batch of softmax probabilities (B, 8).

    A calibrating policy (DTM) gives calibrated probabilities, their argmax and its own mask;
    otherwise the softmax, its argmax and ``confidence >= threshold of the label``.
    """
    if policy is not None:
        mask, label = policy.mask(probs)
        q = policy.calibrated(probs)
        conf = q.gather(1, label[:, None]).squeeze(1)
        keep = mask.bool() if thr is not None else torch.ones(len(q), dtype=torch.bool)
        return q.numpy(), label.numpy(), conf.numpy(), keep.numpy()
    p = probs.numpy()
    label, conf = p.argmax(1), p.max(1)
    keep = np.ones(len(p), bool) if thr is None else conf >= thr[label]
    return p, label, conf, keep


def _run(model, cfg, sources, shard: Shard, sink: CsvOut, report: PseudoLabelReport, thr, batch_size: int,
         device: str, workers: int, progress: bool, policy=None) -> None:
    size, channels = cfg.data.image_size, cfg.data.channels
    items = _items(sources, shard, report.skips)
    pool = ThreadPoolExecutor(workers) if workers > 0 else None
    last_print = time.perf_counter()
    try:
        for keys, specs, names, x in _batches(items, size, batch_size, channels, pool, report.skips):
            with torch.inference_mode():
                logits = model(torch.from_numpy(x).to(device).float().div_(255.0))
                probs, label, conf, keep = _label(torch.softmax(logits.float(), 1).cpu(), thr, policy)
            report.samples += len(probs)
            report.below_threshold += int((~keep).sum())
            for j in np.flatnonzero(keep):
                sink.writerows([[specs[j], names[j], *(f"{v:.6f}" for v in probs[j]), ABAW_LABELS[int(label[j])],
                                 f"{conf[j]:.6f}"]], keys[j] if sink.keys else ())
                report.rows += 1
            if progress and time.perf_counter() - last_print > 10:
                last_print = time.perf_counter()
                print(f"  {report.samples} samples labelled ({report.skips.total} skipped)", flush=True)
    finally:
        if pool is not None:
            pool.shutdown()


def _write_summary(out: Path, report: PseudoLabelReport) -> None:
    data = {"csv": str(report.csv), **{k: getattr(report, k) for k in _COUNTS}, "seconds": round(report.seconds, 3),
            "skipped": skips_to_dict(report.skips), **report.info}
    tmp = out / f".{STEM}.json.partial"
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(out / f"{STEM}.json")


def merge_pseudolabels(out: Path | str, count: int | None = None, launched: bool = False) -> PseudoLabelReport:
    """``OUT/pseudolabels.csv`` (+ .json) from the shard files; refused, naming them, while any is missing."""
    out = Path(out)
    metas = merge_shards(out, STEM, PL_COLUMNS, out / f"{STEM}.csv", count, launched)
    info = {k: metas[0].get(k) for k in ("checkpoint", "weights", "unlabeled", "thresholds", "thresholds_from",
                                          "probabilities", "calibration")}
    report = PseudoLabelReport(out / f"{STEM}.csv", **{k: sum(m[k] for m in metas) for k in _COUNTS},
                               seconds=max(m["seconds"] for m in metas),
                               skips=skips_from_dicts([m["skips"] for m in metas]), info=info,
                               shard=f"merged {len(metas)} shards")
    _write_summary(out, report)
    return report
