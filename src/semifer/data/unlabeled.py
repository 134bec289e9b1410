"""Unlabeled face sources that scale to face-recognition size, and a streaming batch source.

Sources hand out *encoded* bytes (or paths); decoding happens later, in DataLoader
workers, through :func:`semifer.data.decode.decode_image`. Two kinds of source:

* **indexed** (``indexed = True``: :class:`ImageFolderSource`, :class:`FileListSource`,
  :class:`RecordIOSource`): know ``len()`` and read sample ``i`` at random. Batches are
  a pure function of ``(seed, step, rank)`` via :class:`~semifer.data.imageset.StepSampler`.
* **streamed** (``indexed = False``: :class:`WebDatasetSource`, :class:`MixedSource`):
  an infinite, deterministic sample stream per consumer ``(rank, worker)``, produced by
  ``samples(seed, rank, world, worker, num_workers)``.

:class:`StreamingBatchSource` turns either into the engine's batch-source interface
(``has_index``, ``__len__``, ``batch(step)``). See ``docs/unlabeled_sources.md``.

Paths and offsets are held in flat numpy arrays (not Python lists), so forked
workers do not copy them page by page through reference counting.
"""
from __future__ import annotations

import glob
import io
import os
import re
import struct
import tarfile
import zlib
from collections import deque
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from semifer.data.decode import SkipCounter, decode_image
from semifer.data.imageset import StepSampler, _mix
from semifer.registry import UNLABELED_SOURCES

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

# A raw stream item: (where, payload, reason). payload is bytes or a path (str) to decode,
# or None with a reason when the item is known bad before decoding (shard errors, ...).
Item = tuple[str, "bytes | str | None", "str | None"]


# --------------------------------------------------------------------------- helpers
class _StringTable:
    """Many strings in one bytes blob + int64 offsets: compact, and fork/copy-on-write friendly."""

    def __init__(self, strings: Sequence[str]) -> None:
        enc = [s.encode("utf-8", "surrogateescape") for s in strings]
        self.offsets = np.zeros(len(enc) + 1, dtype=np.int64)
        if enc:
            np.cumsum([len(e) for e in enc], out=self.offsets[1:])
        self.blob = np.frombuffer(b"".join(enc), dtype=np.uint8) if enc else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.blob[a:b].tobytes().decode("utf-8", "surrogateescape")


def _consumer() -> tuple[int, int]:
    """(worker_id, num_workers) of the current DataLoader worker, (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _indexed_stream(src, seed: int, rank: int, world: int, worker: int, num_workers: int) -> Iterator[Item]:
    """Infinite stream over an indexed source: per-epoch permutation, consumer c takes positions i % C == c."""
    n, C, c = len(src), world * num_workers, rank * num_workers + worker
    epoch = 0
    while True:
        perm = np.random.default_rng(_mix(seed, epoch, 0x1D)).permutation(n)
        for i in perm[c::C] if n >= C else perm[c % n::n]:
            yield src.read(int(i))
        epoch += 1


# --------------------------------------------------------------------------- folder / list
class _PathListSource:
    """Shared part of the indexed sources backed by a table of relative paths under ``root``."""

    root: str
    paths: "_StringTable"

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i])

    def read(self, i: int) -> Item:
        p = self.path(i)
        return p, p, None

    def samples(self, seed: int, rank: int = 0, world: int = 1, worker: int = 0, num_workers: int = 1) -> Iterator[Item]:
        return _indexed_stream(self, seed, rank, world, worker, num_workers)


@UNLABELED_SOURCES.register("folder")
class ImageFolderSource(_PathListSource):
    """Every jpg/jpeg/png/bmp/webp under ``root`` (recursive, case-insensitive, sorted); indexed.

    Symlinked folders are followed once (by real path), so symlink loops cannot hang the scan.
    """

    indexed = True

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.skipped: dict[str, int] = {}
        found: list[str] = []
        seen: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen:  # loop or second route to the same folder
                dirnames[:] = []
                continue
            seen.add(real)
            dirnames.sort()
            rel = os.path.relpath(dirpath, self.root)
            for f in filenames:
                if f.lower().endswith(IMAGE_EXTS):
                    found.append(f if rel == "." else os.path.join(rel, f))
        found.sort()
        self.paths = _StringTable(found)

    def describe(self) -> str:
        return f"folder:{self.root} ({len(self)} images)"


@UNLABELED_SOURCES.register("list")
class FileListSource(_PathListSource):
    """One image path per line, relative to the list's folder (or ``root``); ``#`` comments, blanks ignored.

    Paths that resolve outside the root are skipped and counted (``skipped['path escapes root']``).
    """

    indexed = True

    def __init__(self, list_file: str | Path, root: str | Path | None = None) -> None:
        self.list_file = Path(list_file)
        self.root = Path(root) if root is not None else self.list_file.parent
        base = os.path.realpath(self.root)
        counter = SkipCounter()
        keep: list[str] = []
        with open(self.list_file, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                s = line.strip()
                if not s or s.startswith("#"):
                    continue
                full = os.path.normpath(os.path.join(base, s))
                if os.path.commonpath([base, full]) != base:
                    counter.add("path escapes root", f"{self.list_file}:{lineno}")
                    continue
                keep.append(os.path.relpath(full, base))
        self.skipped = counter.as_dict()
        self.paths = _StringTable(keep)

    def describe(self) -> str:
        return f"list:{self.list_file} ({len(self)} images, root {self.root})"


# --------------------------------------------------------------------------- WebDataset
def expand_braces(pattern: str) -> list[str]:
    """``a/{000..002}.tar`` -> a/000.tar a/001.tar a/002.tar (zero padding kept); ``{x,y}`` lists too."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        a, b = r.group(1), r.group(2)
        width = len(a) if a.startswith("0") or len(a) == len(b) else 0
        opts = [str(i).zfill(width) for i in range(int(a), int(b) + 1)]
    else:
        opts = body.split(",")
    return [x for o in opts for x in expand_braces(head + o + tail)]


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the basename, ext = the rest (lowercased)."""
    d, base = os.path.split(name)
    k, dot, ext = base.partition(".")
    return (os.path.join(d, k) if d else k), ext.lower()


@UNLABELED_SOURCES.register("wds")
class WebDatasetSource:
    """Tar shards (brace patterns, globs or a list), samples grouped by key; streamed.

    Tars are read with ``tarfile`` in streaming mode, so memory never holds more than one
    member. A corrupt or truncated shard yields one bad item (``truncated shard`` /
    ``corrupt shard``) and the stream goes on with the next shard.
    """

    indexed = False

    def __init__(self, pattern_or_list: str | Sequence[str], shuffle_buffer: int = 0) -> None:
        pats = [pattern_or_list] if isinstance(pattern_or_list, (str, Path)) else list(pattern_or_list)
        shards: list[str] = []
        for p in pats:
            for q in expand_braces(str(p)):
                shards.extend(sorted(glob.glob(q)) if glob.has_magic(q) else [q])
        if not shards:
            raise FileNotFoundError(f"no tar shards match {pattern_or_list!r}")
        self.shards = shards
        self.shuffle_buffer = int(shuffle_buffer)
        self.skipped: dict[str, int] = {}

    def __len__(self) -> int:
        raise TypeError("a WebDataset stream has no length")

    def describe(self) -> str:
        return f"wds:{len(self.shards)} shards ({self.shards[0]} ...), shuffle buffer {self.shuffle_buffer}"

    @staticmethod
    def read_shard(path: str) -> Iterator[Item]:
        """Samples of one shard in tar order; a trailing bad item on a corrupt/truncated shard."""
        cur_key: str | None = None
        cur: dict[str, bytes] = {}

        def emit(key: str, parts: dict[str, bytes]) -> Item:
            where = f"{path}:{key}"
            for ext in WDS_IMAGE_EXTS:
                if ext in parts:
                    return where, parts[ext], None
            return where, None, "no image in sample"

        try:
            with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    key, ext = _split_key(m.name)
                    if key != cur_key:
                        if cur_key is not None:
                            yield emit(cur_key, cur)
                        cur_key, cur = key, {}
                    if ext in WDS_IMAGE_EXTS and ext not in cur:
                        f = tf.extractfile(m)
                        data = f.read() if f is not None else b""
                        if len(data) != m.size:
                            raise tarfile.ReadError("unexpected end of data")
                        cur[ext] = data
                    else:
                        cur.setdefault(ext, b"")  # presence only; data skipped by the stream
                # tarfile ends silently at a cut header or inside skipped data: the end must lie
                # within the file (uncompressed tars; compressed ones fail in the decompressor)
                if getattr(tf.fileobj, "comptype", "tar") == "tar" and os.fstat(fh.fileno()).st_size < tf.offset + 512:
                    raise tarfile.ReadError("unexpected end of data")
        except FileNotFoundError:
            yield path, None, "missing shard"
            return
        except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as e:
            msg = str(e).lower()
            yield path, None, "truncated shard" if ("end of" in msg or "truncated" in msg or isinstance(e, EOFError)) else "corrupt shard"
            return
        if cur_key is not None:
            yield emit(cur_key, cur)

    def shard_order(self, seed: int, epoch: int) -> list[str]:
        perm = np.random.default_rng(_mix(seed, epoch, 0xA7)).permutation(len(self.shards))
        return [self.shards[i] for i in perm]

    def epoch_samples(self, seed: int, epoch: int, rank: int = 0, world: int = 1, worker: int = 0,
                      num_workers: int = 1) -> Iterator[Item]:
        """Consumer ``(rank, worker)``'s share of one epoch (before the shuffle buffer).

        Shard ``i`` of the epoch's shuffled list goes to consumer ``c = rank*num_workers + worker``
        when ``i % C == c`` (``C = world*num_workers``). With fewer shards than consumers, the
        ``C`` consumers are split over shards (``c % S``) and the consumers sharing a shard take
        its samples by position (``pos % m == c // S``, ``m`` = consumers on that shard).
        """
        order = self.shard_order(seed, epoch)
        S, C, c = len(order), world * num_workers, rank * num_workers + worker
        if S >= C:
            for path in order[c::C]:
                yield from self.read_shard(path)
        else:
            i, sub = c % S, c // S
            m = len(range(i, C, S))
            for pos, item in enumerate(self.read_shard(order[i])):
                if pos % m == sub:
                    yield item

    def samples(self, seed: int, rank: int = 0, world: int = 1, worker: int = 0, num_workers: int = 1) -> Iterator[Item]:
        """Infinite deterministic stream for one consumer: epochs 0, 1, ... each through the shuffle buffer."""
        epoch = 0
        while True:
            it = self.epoch_samples(seed, epoch, rank, world, worker, num_workers)
            got = 0
            if self.shuffle_buffer > 1:
                rng = np.random.default_rng(_mix(seed, epoch, rank, worker, 0xB0))
                buf: list[Item] = []
                for item in it:
                    got += 1
                    if len(buf) < self.shuffle_buffer:
                        buf.append(item)
                        continue
                    j = int(rng.integers(len(buf)))
                    buf[j], item = item, buf[j]
                    yield item
                order = rng.permutation(len(buf))
                for j in order:
                    yield buf[j]
            else:
                for item in it:
                    got += 1
                    yield item
            if got == 0:
                raise RuntimeError(f"consumer (rank {rank}, worker {worker}) got no samples from {self.describe()}")
            epoch += 1


# --------------------------------------------------------------------------- RecordIO
RECORDIO_MAGIC = 0xCED7230A
_IR_FORMAT = "<IfQQ"
_IR_SIZE = struct.calcsize(_IR_FORMAT)  # 24


def read_record_at(fh, offset: int) -> bytes:
    """The payload of the MXNet RecordIO record at ``offset`` (multi-part records joined).

    Record = magic uint32, lrecord uint32 (cflag = upper 3 bits, length = lower 29), payload
    padded to 4 bytes. cflag 0 = whole record, 1/2/3 = start/middle/end of a record that the
    writer split where the payload contained the magic word; the parts are joined with the
    magic word put back in between.
    """
    fh.seek(offset)
    parts: list[bytes] = []
    while True:
        head = fh.read(8)
        if len(head) < 8:
            raise EOFError("truncated record header")
        magic, lrec = struct.unpack("<II", head)
        if magic != RECORDIO_MAGIC:
            raise ValueError("bad record magic")
        cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        data = fh.read(length)
        if len(data) < length:
            raise EOFError("truncated record")
        pad = (-length) % 4
        if pad:
            fh.seek(pad, os.SEEK_CUR)
        if parts and cflag not in (2, 3):
            raise ValueError("bad continuation flag")
        parts.append(data)
        if cflag in (0, 3):
            break
        if cflag not in (1, 2):
            raise ValueError("bad continuation flag")
    return struct.pack("<I", RECORDIO_MAGIC).join(parts)


def unpack_image_record(payload: bytes) -> tuple[tuple[int, float | np.ndarray, int, int], bytes]:
    """Split an image record into its IRHeader ``(flag, label, id, id2)`` and the image bytes."""
    if len(payload) < _IR_SIZE:
        raise ValueError("record shorter than its header")
    flag, label, id1, id2 = struct.unpack(_IR_FORMAT, payload[:_IR_SIZE])
    rest = payload[_IR_SIZE:]
    if flag > 0:
        if len(rest) < 4 * flag:
            raise ValueError("record shorter than its labels")
        label = np.frombuffer(rest[:4 * flag], dtype="<f4").copy()
        rest = rest[4 * flag:]
    return (flag, label, id1, id2), rest


@UNLABELED_SOURCES.register("recordio")
class RecordIOSource:
    """insightface/MXNet ``train.rec`` + ``train.idx`` read without mxnet; indexed by the .idx keys.

    A leading header record (record 0 of insightface sets: flag > 0, labels = id range, no image)
    is left out of the index and counted in ``skipped['header record']``. Any other record without
    image bytes is skipped when read (``no image in record``).
    """

    indexed = True

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None) -> None:
        self.rec_path = str(rec_path)
        self.idx_path = str(idx_path) if idx_path is not None else os.path.splitext(self.rec_path)[0] + ".idx"
        keys, offs = [], []
        with open(self.idx_path, encoding="ascii") as fh:
            for line in fh:
                f = line.split()
                if len(f) >= 2:
                    keys.append(int(f[0]))
                    offs.append(int(f[1]))
        self.keys = np.asarray(keys, dtype=np.int64)
        self.offsets = np.asarray(offs, dtype=np.int64)
        self.skipped: dict[str, int] = {}
        self._fh = None
        self._pid = None
        if len(self.keys):
            try:
                (flag, _, _, _), img = unpack_image_record(self.read_record(0))
                if flag > 0 and len(img) == 0:
                    self.keys, self.offsets = self.keys[1:], self.offsets[1:]
                    self.skipped["header record"] = 1
            except (ValueError, EOFError):
                pass  # counted when read

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_fh"], d["_pid"] = None, None
        return d

    def _file(self):
        if self._fh is None or self._pid != os.getpid():  # one handle per process (forked workers)
            self._fh, self._pid = open(self.rec_path, "rb"), os.getpid()
        return self._fh

    def __len__(self) -> int:
        return len(self.keys)

    def read_record(self, i: int) -> bytes:
        return read_record_at(self._file(), int(self.offsets[i]))

    def read(self, i: int) -> Item:
        where = f"{self.rec_path}#{int(self.keys[i])}"
        try:
            _, img = unpack_image_record(self.read_record(i))
        except EOFError:
            return where, None, "truncated record"
        except ValueError:
            return where, None, "corrupt record"
        if not img:
            return where, None, "no image in record"
        return where, img, None

    def samples(self, seed: int, rank: int = 0, world: int = 1, worker: int = 0, num_workers: int = 1) -> Iterator[Item]:
        return _indexed_stream(self, seed, rank, world, worker, num_workers)

    def describe(self) -> str:
        return f"recordio:{self.rec_path} ({len(self)} records)"


# --------------------------------------------------------------------------- mixing / specs
class MixedSource:
    """Streams mixed by weights: at every stream position a child is drawn with probability
    ``weight / sum(weights)`` from an RNG seeded by (seed, rank, worker); streamed (no index)."""

    indexed = False

    def __init__(self, parts: Sequence[tuple[object, float]]) -> None:
        if not parts:
            raise ValueError("MixedSource needs at least one (source, weight)")
        self.sources = [s for s, _ in parts]
        w = np.asarray([float(x) for _, x in parts], dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError("weights must be >= 0 with a positive sum")
        self.weights = w / w.sum()
        self.skipped: dict[str, int] = {}
        for s in self.sources:
            for k, v in getattr(s, "skipped", {}).items():
                self.skipped[k] = self.skipped.get(k, 0) + v

    def __len__(self) -> int:
        raise TypeError("a mixed stream has no length")

    def samples(self, seed: int, rank: int = 0, world: int = 1, worker: int = 0, num_workers: int = 1) -> Iterator[Item]:
        its = [s.samples(_mix(seed, k, 0x3C), rank, world, worker, num_workers) for k, s in enumerate(self.sources)]
        rng = np.random.default_rng(_mix(seed, rank, worker, 0xC3))
        cdf = np.cumsum(self.weights)
        while True:
            for k in np.minimum(np.searchsorted(cdf, rng.random(1024), side="right"), len(its) - 1):
                yield next(its[k])

    def describe(self) -> str:
        return "mixed(" + ", ".join(f"{w:.3g}*{s.describe()}" for s, w in zip(self.sources, self.weights)) + ")"


def open_unlabeled(spec: str):
    """``folder:PATH``, ``list:PATH``, ``wds:PATTERN``, ``recordio:PATH.rec`` -> a source.

    An optional leading ``stream:`` (``stream:folder:PATH``) is accepted, so configs can tell
    streamed unlabeled specs apart from the in-memory formats of ``semifer.data.formats``.
    """
    if spec.startswith("stream:"):
        spec = spec[len("stream:"):]
    kind, sep, arg = spec.partition(":")
    if not sep or not arg:
        raise ValueError(f"unlabeled source spec must be KIND:PATH, got {spec!r}")
    try:
        make = UNLABELED_SOURCES.get(kind.strip().lower())
    except KeyError as e:
        raise ValueError(e.args[0]) from None
    return make(arg)


# --------------------------------------------------------------------------- batches
class _BatchStream(torch.utils.data.IterableDataset):
    """Yields whole decoded batches ``start, start+1, ...`` for one rank, one per worker in turn.

    The DataLoader polls workers round-robin, so physical worker ``w`` builds batches
    ``start + w + t*W``. For streamed sources each batch ``k`` is built from the stream of
    *virtual* worker ``v = k % W`` (physical worker ``w`` plays ``v = (start + w) % W``), at
    positions ``j*B ...`` with ``j = k // W``: a pure function of ``(seed, k, rank, world, W)``.
    """

    def __init__(self, source, batch_size: int, size: int, channels: int, seed: int, rank: int,
                 world: int, num_workers: int, start: int, stream: int) -> None:
        self.source, self.B, self.size, self.channels = source, batch_size, size, channels
        self.seed, self.rank, self.world, self.W, self.start, self.stream = seed, rank, world, max(1, num_workers), start, stream

    def __iter__(self):
        w, nw = _consumer()
        if nw != 1 and nw != self.W:
            raise RuntimeError(f"expected {self.W} workers, got {nw}")
        if nw == 1 and self.W > 1:  # main-process iteration: play every virtual worker in turn
            gens = [self._gen(w2) for w2 in range(self.W)]
            while True:
                for g in gens:
                    yield next(g)
        yield from self._gen(w)

    def _gen(self, w: int):
        if getattr(self.source, "indexed", False):
            return self._indexed(w)
        return self._streamed(w)

    def _decode(self, payload):
        return decode_image(payload, self.size, self.channels)

    def _indexed(self, w: int):
        src, n = self.source, len(self.source)
        sampler = StepSampler(n, self.B, self.seed, self.rank, self.world, self.stream)
        k = self.start + w
        while True:
            idx = sampler.indices(k).numpy()
            x = np.empty((self.B, self.channels, self.size, self.size), dtype=np.uint8)
            out_idx = np.empty(self.B, dtype=np.int64)
            bad: list[tuple[str, str]] = []
            for b, i in enumerate(idx):
                i = int(i)
                for tries in range(n):  # replacement: the next good index (deterministic)
                    j = (i + tries) % n
                    where, payload, reason = src.read(j)
                    arr = None
                    if payload is not None:
                        arr, reason = self._decode(payload)
                    if arr is not None:
                        x[b], out_idx[b] = arr, j
                        break
                    if tries == 0:  # counted where it was sampled, not when met as a replacement candidate
                        bad.append((reason or "unknown", where))
                else:
                    raise RuntimeError(f"no decodable image in {src.describe()}")
            yield {"step": k, "x": x, "idx": out_idx, "bad": bad}
            k += self.W

    def _streamed(self, w: int):
        v = (self.start + w) % self.W
        k = self.start + w
        j = k // self.W
        it = iter(self.source.samples(_mix(self.seed, self.stream), self.rank, self.world, v, self.W))
        pos = 0  # position of the next raw item from `it`
        cache: deque = deque()  # decoded look-ahead (pos, arr, reason, where), pos increasing
        while True:
            lo, hi = j * self.B, (j + 1) * self.B
            while cache and cache[0][0] < lo:
                cache.popleft()
            while pos < lo:  # fast-forward without decoding
                next(it)
                pos += 1
            x = np.empty((self.B, self.channels, self.size, self.size), dtype=np.uint8)
            filled, bad, ci, misses = 0, [], 0, 0
            while filled < self.B:
                if ci < len(cache):
                    p, arr, reason, where = cache[ci]
                    ci += 1
                else:
                    where, payload, reason = next(it)
                    p, pos = pos, pos + 1
                    arr = None
                    if payload is not None:
                        arr, reason = self._decode(payload)
                    cache.append((p, arr, reason, where))
                    ci += 1
                if arr is None:
                    if p < hi:  # each bad item is counted by the batch whose range holds it
                        bad.append((reason or "unknown", where))
                    misses += 1
                    if misses > 100 * self.B + 10000:
                        raise RuntimeError(f"no decodable images in {self.source.describe()}")
                    continue
                x[filled] = arr
                filled += 1
            yield {"step": k, "x": x, "idx": None, "bad": bad}
            k += self.W
            j += 1


class StreamingBatchSource:
    """Engine batch source over an unlabeled source, decoding in DataLoader workers.

    ``batch(step)`` returns ``{"x": uint8 (B, C, size, size), "y": int64 (B,) of -1, "idx": int64
    (B,) dataset indices or None (streamed sources), "y_true": None}``. Batches are a pure function
    of ``(seed, step, rank)`` (streamed sources: also of ``world_size`` and ``num_workers``), so
    asking for ``batch(k)`` first gives exactly what an uninterrupted run gets at step ``k``.
    Unusable samples are replaced by the next good one and counted in :attr:`skipped`.
    """

    def __init__(self, source, batch_size: int, size: int, channels: int = 3, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 2, prefetch: int = 2, stream: int = 2,
                 pin_memory: bool | None = None) -> None:
        self.source = source
        self.has_index = bool(getattr(source, "indexed", False))
        self.batch_size, self.size, self.channels, self.seed = batch_size, size, channels, seed
        self.rank, self.world, self.num_workers, self.prefetch, self.stream = rank, world_size, num_workers, prefetch, stream
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.counter = SkipCounter()
        for k, v in getattr(source, "skipped", {}).items():
            self.counter.counts[k] += v
        self._loader = None
        self._it = None
        self._next = None  # step the iterator yields next

    def __len__(self) -> int:
        return len(self.source) if self.has_index else 0

    @property
    def skipped(self) -> dict[str, int]:
        return self.counter.as_dict()

    def describe(self) -> str:
        return f"streaming({self.source.describe()}, batch {self.batch_size}, {self.num_workers} workers)"

    def _open(self, start: int) -> None:
        self.close()
        ds = _BatchStream(self.source, self.batch_size, self.size, self.channels, self.seed, self.rank,
                          self.world, self.num_workers, start, self.stream)
        kw = {}
        if self.num_workers > 0:
            kw = dict(persistent_workers=True, prefetch_factor=self.prefetch)
        self._loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                                   pin_memory=self.pin_memory, **kw)
        self._it = iter(self._loader)
        self._next = start

    def close(self) -> None:
        it, self._it, self._loader = self._it, None, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def batch(self, step: int) -> dict[str, torch.Tensor | None]:
        gap = 0 if self._next is None else step - self._next
        if self._it is None or gap < 0 or gap > 2 * max(1, self.num_workers) * self.prefetch:
            self._open(step)
        while True:
            out = next(self._it)
            self._next = int(out["step"]) + 1
            for reason, where in out["bad"]:
                self.counter.add(reason, where)
            if int(out["step"]) == step:
                break
        x = out["x"]
        x = x if isinstance(x, torch.Tensor) else torch.from_numpy(x)
        idx = out["idx"]
        if idx is not None and not isinstance(idx, torch.Tensor):
            idx = torch.from_numpy(idx)
        return {"x": x, "y": torch.full((x.shape[0],), -1, dtype=torch.int64), "idx": idx, "y_true": None}


# --------------------------------------------------------------------------- benchmark
def _bench_make(out: str, shards: int, per_shard: int, img: int, kind: str = "wds") -> None:
    from PIL import Image
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:img, 0:img]
    for s in range(shards):
        path = os.path.join(out, f"{s:06d}.tar")
        if kind == "folder":
            sub = os.path.join(out, f"{s:06d}")
            if not os.path.isdir(sub):
                os.makedirs(sub + ".tmp", exist_ok=True)
                for i in range(per_shard):
                    a = np.clip(rng.normal(100, 40, (img, img, 3)), 0, 255).astype(np.uint8)
                    Image.fromarray(a).save(os.path.join(sub + ".tmp", f"{i:05d}.jpg"), quality=90)
                os.replace(sub + ".tmp", sub)
            continue
        if os.path.exists(path):
            continue
        with tarfile.open(path + ".tmp", "w") as tf:
            for i in range(per_shard):
                cx, cy, r = rng.uniform(0.3, 0.7) * img, rng.uniform(0.3, 0.7) * img, rng.uniform(0.2, 0.4) * img
                face = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r)[..., None] * rng.uniform(80, 200, 3)
                a = np.clip(face + rng.normal(60, 25, (img, img, 3)), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(a).save(buf, "JPEG", quality=90)
                ti = tarfile.TarInfo(f"s{s:06d}_{i:05d}.jpg")
                ti.size = buf.tell()
                buf.seek(0)
                tf.addfile(ti, buf)
        os.replace(path + ".tmp", path)


def _bench(argv: Sequence[str] | None = None) -> dict:
    """``python -m semifer.data.unlabeled --shards 20 --per-shard 500``: one streamed epoch, decoded in workers."""
    import argparse
    import json
    import multiprocessing as mp
    import resource
    import time

    ap = argparse.ArgumentParser(description=_bench.__doc__)
    ap.add_argument("--dir", default="/tmp/semifer_wds_bench")
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--per-shard", type=int, default=500)
    ap.add_argument("--img", type=int, default=112, help="stored JPEG side")
    ap.add_argument("--size", type=int, default=112, help="decoded side")
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--kind", choices=["wds", "folder"], default="wds", help="tar shards or a folder of shard folders")
    a = ap.parse_args(argv)
    d = os.path.join(a.dir, f"{a.kind}_{a.shards}x{a.per_shard}_{a.img}")
    p = mp.get_context("spawn").Process(target=_bench_make, args=(d, a.shards, a.per_shard, a.img, a.kind))
    p.start()
    p.join()  # built in a child so the parent's peak RSS is the loader's alone
    src = WebDatasetSource(os.path.join(d, "*.tar")) if a.kind == "wds" else ImageFolderSource(d)
    total = a.shards * a.per_shard
    steps = total // a.batch
    sbs = StreamingBatchSource(src, a.batch, a.size, 3, seed=0, num_workers=a.workers, prefetch=2)
    t0 = time.perf_counter()
    sbs.batch(0)
    t1 = time.perf_counter()
    for k in range(1, steps):
        sbs.batch(k)
    t2 = time.perf_counter()
    worker_peaks = []
    for w in getattr(sbs._it, "_workers", []):
        try:
            with open(f"/proc/{w.pid}/status") as fh:
                worker_peaks += [int(line.split()[1]) // 1024 for line in fh if line.startswith("VmHWM")]
        except OSError:
            pass
    sbs.close()
    res = {"kind": a.kind, "shards": a.shards, "images": steps * a.batch, "batch": a.batch, "workers": a.workers,
           "decode_size": a.size, "first_batch_s": round(t1 - t0, 2),
           "img_per_s": round((steps - 1) * a.batch / (t2 - t1), 1),
           "main_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
           "worker_peak_rss_mb": worker_peaks, "skipped": sbs.skipped}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    _bench()
