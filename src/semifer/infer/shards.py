"""Splitting ``predict`` / ``pseudolabel`` over processes and merging what they wrote.

A run over W processes (``torchrun`` ranks, or independent jobs given ``--shard I/W``) is W
*shards*. Work items (``predict``: sources after :func:`~semifer.faces.media.expand_inputs`;
``pseudolabel``: samples of the unlabeled sources) are numbered in the order a single process
handles them and item ``i`` goes to shard ``i % W`` (round robin: a sorted folder that mixes
long videos and images spreads over all shards, and no list of items is ever exchanged).

Shard ``I`` of ``W`` writes ``OUT/shards/STEM.I-of-W.csv``: the output columns preceded by its
items' *order keys* (integers), and ``STEM.I-of-W.json``: the job's fingerprint, counts and
skipped inputs. Both go through a temp file and a rename, the json first, so an existing csv
means a complete shard. :func:`merge_shards` merges the W csv files by order key (a streaming
k-way merge, O(W) memory) into exactly the rows and row order of a one-process run.
"""
from __future__ import annotations

import csv
import hashlib
import heapq
import json
import os
import re
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Iterator

from semifer.data.decode import SkipCounter

SHARD_DIR = "shards"


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``; ``launched``: the count and index come from torchrun's environment."""

    index: int = 0
    count: int = 1
    launched: bool = False

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard must be I/N with 0 <= I < N, got {self.index}/{self.count}")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def indices(self, n: int) -> range:
        """The items of ``n`` (numbered 0..n-1) this shard handles."""
        return range(self.index, n, self.count)


def parse_shard(text: str) -> Shard:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if m is None:
        raise ValueError(f"--shard wants I/N (e.g. 0/4), got {text!r}")
    return Shard(int(m.group(1)), int(m.group(2)))


def pick_shard(arg: str | None = None) -> Shard:
    """``--shard I/N`` if given, else torchrun's RANK/WORLD_SIZE, else the whole job (0/1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if arg is not None:
        if world > 1:
            raise ValueError("--shard is for independent jobs; under torchrun the shard is the rank")
        return parse_shard(arg)
    if world > 1:
        return Shard(int(os.environ["RANK"]), world, launched=True)
    return Shard()


def device_for(device: str, shard: Shard) -> str:
    """``cuda`` under torchrun means this rank's GPU (LOCAL_RANK)."""
    if device == "cuda" and shard.launched:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def wait_for_ranks(shard: Shard) -> None:
    """Barrier over torchrun's ranks (gloo, 7-day timeout: ranks finish their shards far apart).

    Uses an existing process group if the caller has one; a group made here is destroyed after.
    """
    if not shard.launched:
        return
    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", timeout=timedelta(days=7))
    try:
        dist.barrier()
    finally:
        if own:
            dist.destroy_process_group()


def fingerprint(settings: dict) -> str:
    """A short hash of the settings that decide a job's output (shards of other jobs are not mixed)."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shard_files(out: Path | str, stem: str, shard: Shard) -> tuple[Path, Path]:
    base = Path(out) / SHARD_DIR / f"{stem}.{shard.index}-of-{shard.count}"
    return base.with_name(base.name + ".csv"), base.with_name(base.name + ".json")


def skips_to_dict(skips: SkipCounter) -> dict:
    return {"counts": dict(skips.counts), "examples": skips.examples}


def skips_from_dicts(items: list[dict]) -> SkipCounter:
    out = SkipCounter()
    for d in items:
        for reason, n in d.get("counts", {}).items():
            out.counts[reason] += n
        for reason, ex in d.get("examples", {}).items():
            keep = out.examples.setdefault(reason, [])
            keep.extend(ex[:max(0, out.max_examples - len(keep))])
    return out


def completed_shard(out: Path | str, stem: str, shard: Shard, fp: str | None = None) -> dict | None:
    """The shard's json if its csv exists (and, with ``fp``, it belongs to the same job), else None."""
    csv_path, meta_path = shard_files(out, stem, shard)
    if not csv_path.is_file() or not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    return meta if fp is None or meta.get("fingerprint") == fp else None


def _fsync_replace(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CsvOut:
    """A csv written to a temp file and renamed when :meth:`commit` is called (never half a file).

    ``keys`` > 0: each row is preceded by that many integer order keys (shard files).
    """

    def __init__(self, path: Path, columns: list[str], keys: int = 0) -> None:
        self.path, self.keys = Path(path), keys
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.partial")
        # surrogateescape: a non-UTF-8 file name is written byte-exact instead of stopping the run
        self.fh = open(self.tmp, "w", newline="", encoding="utf-8", errors="surrogateescape")
        self.writer = csv.writer(self.fh, lineterminator="\n")
        self.writer.writerow([f"_order{k}" for k in range(keys)] + columns)

    def writerows(self, rows: list[list], key: tuple[int, ...] = ()) -> None:
        if len(key) != self.keys:
            raise ValueError(f"expected {self.keys} order keys, got {key}")
        self.writer.writerows([[*key, *r] for r in rows] if key else rows)

    def flush(self) -> None:
        self.fh.flush()

    def commit(self, meta: dict | None = None, meta_path: Path | None = None) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        if meta is not None and meta_path is not None:
            tmp = meta_path.with_name(f".{meta_path.name}.partial")
            tmp.write_text(json.dumps(meta, indent=1, default=str))
            _fsync_replace(tmp, meta_path)
        _fsync_replace(self.tmp, self.path)

    def abort(self) -> None:
        if not self.fh.closed:
            self.fh.close()


class MissingShards(ValueError):
    """Merging was asked before every shard was written."""


def _shard_counts(out: Path, stem: str) -> dict[int, list[int]]:
    """{N: [indices whose csv exists]} for the ``STEM.I-of-N`` files under ``OUT/shards``."""
    found: dict[int, list[int]] = {}
    pat = re.compile(rf"{re.escape(stem)}\.(\d+)-of-(\d+)\.(csv|json)")
    for p in (out / SHARD_DIR).glob(f"{stem}.*-of-*.*"):
        m = pat.fullmatch(p.name)
        if m:
            i, n = int(m.group(1)), int(m.group(2))
            found.setdefault(n, [])
            if m.group(3) == "csv" and i not in found[n]:
                found[n].append(i)
    return found


def check_shards(out: Path | str, stem: str, count: int | None = None) -> tuple[int, list[dict]]:
    """(N, the N shard metas) when every shard of one job is complete; MissingShards otherwise."""
    out = Path(out)
    found = _shard_counts(out, stem)
    if count is None:
        if not found:
            raise MissingShards(f"no shard files {stem}.I-of-N.csv under {out / SHARD_DIR}")
        if len(found) > 1:
            raise MissingShards(f"{out / SHARD_DIR} holds shards of runs split {sorted(found)} ways; "
                                "remove the files of the run you do not want")
        count = next(iter(found))
    missing = [Shard(i, count) for i in range(count) if completed_shard(out, stem, Shard(i, count)) is None]
    if missing:
        names = ", ".join(f"{s} ({shard_files(out, stem, s)[0].name})" for s in missing)
        raise MissingShards(f"cannot merge {out}: {len(missing)} of {count} shards missing: {names}")
    metas = [completed_shard(out, stem, Shard(i, count)) for i in range(count)]
    odd = [str(Shard(i, count)) for i, m in enumerate(metas) if m.get("fingerprint") != metas[0].get("fingerprint")]
    if odd:
        raise ValueError(f"cannot merge {out}: shards {', '.join(odd)} were made with other settings or inputs "
                         f"than shard 0/{count} (fingerprints differ); rerun them")
    return count, metas


def _rows(path: Path, keys: int) -> Iterator[tuple[tuple[int, ...], list[str]]]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        reader = csv.reader(fh)
        next(reader)
        for row in reader:
            yield tuple(int(v) for v in row[:keys]), row[keys:]


def merge_shards(out: Path | str, stem: str, columns: list[str], final: Path | str,
                 count: int | None = None, launched: bool = False) -> list[dict]:
    """Merge the complete shards of ``OUT/shards/STEM.*`` into ``final`` (atomically); returns their metas.

    ``launched``: called by torchrun's rank 0 after the barrier, where a missing shard means
    the ranks do not share OUT's file system.
    """
    out = Path(out)
    csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))
    try:
        count, metas = check_shards(out, stem, count)
    except MissingShards as e:
        if launched:
            raise MissingShards(f"{e}. Every rank finished: on several nodes OUT must be a folder all nodes "
                                "share (or copy the shard files together and run with --merge OUT)") from None
        raise
    keys = int(metas[0].get("order_keys", 1))
    sink = CsvOut(Path(final), columns)
    try:
        streams = [_rows(shard_files(out, stem, Shard(i, count))[0], keys) for i in range(count)]
        for _, row in heapq.merge(*streams, key=lambda kr: kr[0]):
            sink.writer.writerow(row)
    except BaseException:
        sink.abort()
        raise
    sink.commit()
    return metas
