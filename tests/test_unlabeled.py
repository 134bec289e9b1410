"""Unlabeled sources (folder, list, WebDataset, RecordIO, mixed) and the streaming batch source."""
from __future__ import annotations

import io
import os
import struct
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semifer.data.unlabeled import (RECORDIO_MAGIC, FileListSource, ImageFolderSource, MixedSource,
                                    RecordIOSource, StreamingBatchSource, WebDatasetSource, expand_braces,
                                    open_unlabeled, read_record_at, unpack_image_record)

SIZE = 16


def jpeg(seed: int, size: int = 20, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    a = np.full((size, size, 3), seed % 251, np.uint8) + rng.integers(0, 4, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, fmt)
    return buf.getvalue()


def write_shards(root: Path, n_shards: int, per_shard: int, bad: set[tuple[int, int]] = frozenset()) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        p = root / f"{s:06d}.tar"
        with tarfile.open(p, "w") as tf:
            for i in range(per_shard):
                key = f"s{s:03d}_{i:04d}"
                data = b"not a jpeg at all" if (s, i) in bad else jpeg(s * 1000 + i)
                for name, payload in ((f"{key}.jpg", data), (f"{key}.cls", b"3")):
                    ti = tarfile.TarInfo(name)
                    ti.size = len(payload)
                    tf.addfile(ti, io.BytesIO(payload))
        paths.append(str(p))
    return paths


# ---------------------------------------------------------------- a RecordIO writer for fixtures
def _encode_record(payload: bytes) -> bytes:
    """One logical record in MXNet RecordIO framing, split where the payload holds the magic word."""
    magic = struct.pack("<I", RECORDIO_MAGIC)
    cuts = [i for i in range(0, len(payload) - len(payload) % 4, 4) if payload[i:i + 4] == magic]
    out, start = [], 0
    pieces = []
    for i in cuts:
        pieces.append(payload[start:i])
        start = i + 4
    pieces.append(payload[start:])
    for n, piece in enumerate(pieces):
        if len(pieces) == 1:
            cflag = 0
        else:
            cflag = 1 if n == 0 else (3 if n == len(pieces) - 1 else 2)
        out.append(magic + struct.pack("<I", (cflag << 29) | len(piece)) + piece + b"\0" * ((-len(piece)) % 4))
    return b"".join(out)


def _ir(img: bytes, label=0.0, key: int = 0, labels: list[float] | None = None) -> bytes:
    if labels is None:
        return struct.pack("<IfQQ", 0, float(label), key, 0) + img
    return struct.pack("<IfQQ", len(labels), 0.0, key, 0) + struct.pack(f"<{len(labels)}f", *labels) + img


def write_recordio(rec: Path, payloads: list[bytes]) -> None:
    offsets = []
    with open(rec, "wb") as fh:
        for p in payloads:
            offsets.append(fh.tell())
            fh.write(_encode_record(p))
    rec.with_suffix(".idx").write_text("".join(f"{k}\t{o}\n" for k, o in enumerate(offsets)))


# ---------------------------------------------------------------- folder / list
@pytest.mark.badinput
def test_folder_recursive_sorted_and_symlink_loop(tmp_path):
    root = tmp_path / "faces"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a").mkdir()
    for rel in ["b/deep/z.PNG", "a/2.jpg", "a/10.JPEG", "top.webp", "b/x.bmp"]:
        fmt = {"png": "PNG", "bmp": "BMP", "webp": "WEBP"}.get(rel.rsplit(".", 1)[1].lower(), "JPEG")
        (root / rel).write_bytes(jpeg(1, fmt=fmt))
    (root / "a" / "notes.txt").write_text("x")
    os.symlink(root, root / "b" / "deep" / "loop")  # a loop back to the root
    src = ImageFolderSource(root)
    got = [src.paths[i] for i in range(len(src))]
    assert got == sorted(["b/deep/z.PNG", "a/2.jpg", "a/10.JPEG", "top.webp", "b/x.bmp"])
    assert src.read(0)[1] == str(root / got[0])
    assert "5 images" in src.describe()


@pytest.mark.badinput
def test_file_list_comments_and_escaping_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    for n in ("a.jpg", "b.jpg"):
        (tmp_path / "imgs" / n).write_bytes(jpeg(2))
    lst = tmp_path / "list.txt"
    lst.write_text("# faces\n\nimgs/a.jpg\n  imgs/b.jpg  \n../outside.jpg\nimgs/../../etc/passwd\n/abs/x.jpg\n")
    src = FileListSource(lst)
    assert len(src) == 2 and src.path(1) == str(tmp_path / "imgs" / "b.jpg")
    assert src.skipped == {"path escapes root": 3}
    src2 = FileListSource(lst, root=tmp_path / "imgs")  # lines are now relative to imgs/
    assert len(src2) == 2 and src2.path(0) == str(tmp_path / "imgs" / "imgs" / "a.jpg")
    assert src2.skipped == {"path escapes root": 3}


# ---------------------------------------------------------------- WebDataset
def test_brace_expansion():
    assert expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]


def _keys(items):
    return [w.rsplit(":", 1)[1] for w, _, _ in items]


@pytest.mark.distributed
@pytest.mark.parametrize("n_shards", [11, 3])  # 3 < 2 ranks x 2 workers: split by position within shards
def test_wds_sharding_covers_each_sample_once(tmp_path, n_shards):
    write_shards(tmp_path, n_shards, 7)
    src = WebDatasetSource(f"{tmp_path}/{{000000..{n_shards - 1:06d}}}.tar")
    for epoch in (0, 1):
        per = {(r, w): _keys(src.epoch_samples(5, epoch, r, 2, w, 2)) for r in range(2) for w in range(2)}
        allkeys = [k for v in per.values() for k in v]
        assert len(allkeys) == len(set(allkeys)) == n_shards * 7
        assert all(per.values())  # every consumer gets work
    if n_shards > 4:  # the shard order is reshuffled per epoch
        assert _keys(src.epoch_samples(5, 0, 0, 2, 0, 2)) != _keys(src.epoch_samples(5, 1, 0, 2, 0, 2))


@pytest.mark.distributed
def test_batch_stream_ranks_and_worker_ids_cover_an_epoch(tmp_path, monkeypatch):
    """2 ranks x 2 DataLoader workers (worker ids simulated): one batch each = the whole epoch, once."""
    from semifer.data.decode import decode_image
    from semifer.data.unlabeled import _BatchStream
    write_shards(tmp_path, 4, 3)
    src = WebDatasetSource(str(tmp_path / "*.tar"))
    got = []
    for rank in range(2):
        for wid in range(2):
            class Info:
                id, num_workers = wid, 2
            monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: Info())
            ds = _BatchStream(src, 3, SIZE, 3, seed=4, rank=rank, world=2, num_workers=2, start=0, stream=2)
            b = next(iter(ds))
            assert b["step"] == wid and b["bad"] == []
            got += [x.tobytes() for x in b["x"]]
    want = [decode_image(p, SIZE, 3)[0].tobytes() for s in range(4) for _, p, _ in WebDatasetSource.read_shard(
        str(tmp_path / f"{s:06d}.tar"))]
    assert len(got) == 12 and sorted(got) == sorted(want)


@pytest.mark.badinput
def test_wds_truncated_shard_counted_and_stream_continues(tmp_path):
    paths = write_shards(tmp_path, 3, 6)
    raw = Path(paths[1]).read_bytes()
    Path(paths[1]).write_bytes(raw[:len(raw) // 2 + 100])  # cut mid-member
    src = WebDatasetSource(paths + [str(tmp_path / "missing.tar")])
    items = list(src.epoch_samples(0, 0))
    reasons = Counter(r for _, _, r in items if r)
    assert reasons == {"truncated shard": 1, "missing shard": 1}
    good = _keys([it for it in items if it[1] is not None])
    assert {k for k in good if k.startswith(("s000", "s002"))} == {f"s{s:03d}_{i:04d}" for s in (0, 2) for i in range(6)}
    assert 0 < sum(k.startswith("s001") for k in good) < 6


def test_wds_shuffle_buffer_is_deterministic_permutation(tmp_path):
    write_shards(tmp_path, 2, 10)
    src = WebDatasetSource(str(tmp_path / "*.tar"), shuffle_buffer=8)
    a = [w for w, _, _ in _take(src.samples(3), 20)]
    b = [w for w, _, _ in _take(src.samples(3), 20)]
    plain = [w for w, _, _ in src.epoch_samples(3, 0)]
    assert a == b and sorted(a) == sorted(plain) and a != plain


def _take(it, n):
    return [next(it) for _ in range(n)]


# ---------------------------------------------------------------- RecordIO
def test_recordio_roundtrip_header_and_multipart(tmp_path):
    imgs = [jpeg(i) for i in range(5)]
    magic = struct.pack("<I", RECORDIO_MAGIC)
    tricky = imgs[3][:4] + magic + imgs[3][4:12] + magic + imgs[3][12:]  # magic words inside, 4-aligned in the record
    header = struct.pack("<IfQQ", 2, 6.0, 0, 0) + struct.pack("<2f", 1.0, 6.0)  # insightface record 0
    payloads = [header, _ir(imgs[0], 0.0, 1), _ir(imgs[1], 1.0, 2, labels=[1.0, 2.0, 3.0]),
                _ir(imgs[2], 2.0, 3), _ir(tricky, 3.0, 4), _ir(imgs[4], 4.0, 5)]
    rec = tmp_path / "train.rec"
    write_recordio(rec, payloads)
    raw = rec.read_bytes()
    flags = [struct.unpack_from("<I", raw, o + 4)[0] >> 29 for o in range(0, len(raw) - 4, 4)
             if struct.unpack_from("<I", raw, o)[0] == RECORDIO_MAGIC]
    assert 1 in flags and 2 in flags and 3 in flags  # the fixture really is multi-part
    src = open_unlabeled(f"recordio:{rec}")
    assert isinstance(src, RecordIOSource) and len(src) == 5 and src.skipped == {"header record": 1}
    with open(rec, "rb") as fh:
        off = [int(line.split()[1]) for line in rec.with_suffix(".idx").read_text().splitlines()]
        for k, p in enumerate(payloads):
            assert read_record_at(fh, off[k]) == p
    got = [src.read(i)[1] for i in range(5)]
    assert got == [imgs[0], imgs[1], imgs[2], tricky, imgs[4]]
    (flag, label, id1, _), img = unpack_image_record(src.read_record(1))
    assert flag == 3 and list(label) == [1.0, 2.0, 3.0] and id1 == 2 and img == imgs[1]


@pytest.mark.badinput
def test_recordio_bad_records_counted(tmp_path):
    rec = tmp_path / "train.rec"
    write_recordio(rec, [_ir(jpeg(0)), _ir(b""), _ir(b"garbage!"), _ir(jpeg(1))])
    data = rec.read_bytes()
    idx = rec.with_suffix(".idx")
    idx.write_text(idx.read_text() + f"4\t{len(data) - 8}\n")  # an offset that is not a record
    src = RecordIOSource(rec)
    assert len(src) == 5 and src.skipped == {}
    assert src.read(1)[2] == "no image in record" and src.read(4)[2] == "corrupt record"
    sbs = StreamingBatchSource(src, batch_size=8, size=SIZE, seed=0, num_workers=0)
    b = sbs.batch(0)
    assert set(b["idx"].tolist()) <= {0, 3} and b["x"].shape == (8, 3, SIZE, SIZE)
    assert set(sbs.skipped) == {"no image in record", "corrupt record", "not an image"}


# ---------------------------------------------------------------- StreamingBatchSource
@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "folder"
    root.mkdir()
    for i in range(40):
        (root / f"{i:03d}.jpg").write_bytes(jpeg(i))
    return root


def test_indexed_batches_shapes_determinism_and_resume(folder):
    src = ImageFolderSource(folder)
    a = StreamingBatchSource(src, batch_size=6, size=SIZE, seed=1, num_workers=2)
    run = [a.batch(k) for k in range(5)]
    assert a.has_index and len(a) == 40
    b0 = run[0]
    assert b0["x"].dtype == torch.uint8 and b0["x"].shape == (6, 3, SIZE, SIZE)
    assert b0["y"].dtype == torch.int64 and (b0["y"] == -1).all() and b0["idx"].dtype == torch.int64
    assert b0["y_true"] is None
    fresh = StreamingBatchSource(src, batch_size=6, size=SIZE, seed=1, num_workers=0)  # worker count is irrelevant
    r = fresh.batch(4)
    assert torch.equal(r["x"], run[4]["x"]) and torch.equal(r["idx"], run[4]["idx"])
    assert torch.equal(fresh.batch(2)["x"], run[2]["x"])  # going back reopens the stream
    other_rank = StreamingBatchSource(src, batch_size=6, size=SIZE, seed=1, rank=1, world_size=2, num_workers=0)
    mine = StreamingBatchSource(src, batch_size=6, size=SIZE, seed=1, rank=0, world_size=2, num_workers=0)
    assert not set(other_rank.batch(0)["idx"].tolist()) & set(mine.batch(0)["idx"].tolist())
    a.close()


@pytest.mark.badinput
def test_indexed_bad_images_replaced_and_counted(folder):
    (folder / "005.jpg").write_bytes(b"")
    (folder / "006.jpg").write_bytes(jpeg(6)[:40])
    (folder / "007.jpg").write_bytes(b"hello")
    src = ImageFolderSource(folder)
    s = StreamingBatchSource(src, batch_size=40, size=SIZE, seed=0, num_workers=0)
    b = s.batch(0)
    assert b["x"].shape[0] == 40 and not {5, 6, 7} & set(b["idx"].tolist())
    assert s.skipped == {"empty file": 1, "truncated image": 1, "not an image": 1}
    assert b["x"][b["idx"] == 8].shape[0] == 4  # 5, 6, 7 replaced by the next good one, 8


def test_streamed_batches_resume_exactly(tmp_path):
    write_shards(tmp_path, 6, 9, bad={(1, 2), (4, 0), (4, 1)})
    src = open_unlabeled(f"wds:{tmp_path}/{{000000..000005}}.tar")
    a = StreamingBatchSource(src, batch_size=5, size=SIZE, seed=2, num_workers=2)
    run = [a.batch(k) for k in range(8)]
    assert not a.has_index and run[0]["idx"] is None and run[0]["x"].shape == (5, 3, SIZE, SIZE)
    assert a.skipped.get("not an image", 0) >= 1
    for k in (3, 6):
        fresh = StreamingBatchSource(src, batch_size=5, size=SIZE, seed=2, num_workers=2)
        assert torch.equal(fresh.batch(k)["x"], run[k]["x"]), k
        assert torch.equal(fresh.batch(k + 1)["x"], run[k + 1]["x"])
        fresh.close()
    a.close()


@pytest.mark.badinput
def test_streamed_bad_samples_replaced_and_counted(tmp_path):
    write_shards(tmp_path, 2, 10, bad={(0, 1), (0, 2), (1, 5)})
    src = WebDatasetSource(str(tmp_path / "*.tar"))
    s = StreamingBatchSource(src, batch_size=20, size=SIZE, seed=0, num_workers=0)
    b = s.batch(0)  # one epoch = 20 samples, 3 bad: the batch fills from the next epoch
    assert b["x"].shape[0] == 20 and s.skipped == {"not an image": 3}
    uniq = {bytes(x.numpy().tobytes()) for x in b["x"][:17]}
    assert len(uniq) == 17  # the 17 good samples of epoch 0, each once


def test_mixed_source_weights(tmp_path):
    d1, d2 = tmp_path / "one", tmp_path / "two"
    for d in (d1, d2):
        d.mkdir()
        for i in range(5):
            (d / f"{i}.jpg").write_bytes(jpeg(i))
    mix = MixedSource([(ImageFolderSource(d1), 3.0), (ImageFolderSource(d2), 1.0)])
    items = _take(mix.samples(0), 4000)
    share = sum("/one/" in w for w, _, _ in items) / len(items)
    assert abs(share - 0.75) < 0.03
    assert [w for w, _, _ in _take(mix.samples(0), 50)] == [w for w, _, _ in items[:50]]
    s = StreamingBatchSource(mix, batch_size=4, size=SIZE, seed=0, num_workers=0)
    assert not s.has_index and s.batch(1)["x"].shape == (4, 3, SIZE, SIZE)
    assert "mixed(0.75*folder" in mix.describe()


def test_open_unlabeled_specs(tmp_path, folder):
    (tmp_path / "l.txt").write_text("folder/000.jpg\n")
    assert isinstance(open_unlabeled(f"folder:{folder}"), ImageFolderSource)
    assert isinstance(open_unlabeled(f"stream:folder:{folder}"), ImageFolderSource)
    assert len(open_unlabeled(f"list:{tmp_path / 'l.txt'}")) == 1
    with pytest.raises(ValueError):
        open_unlabeled("zip:foo")
    with pytest.raises(FileNotFoundError):
        open_unlabeled(f"wds:{tmp_path}/nothing-*.tar")
