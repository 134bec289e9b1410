"""Pack the FER2013 SSL benchmark's data into one small archive for a GPU machine's `carry`.

    python benchmarks/pack_data.py --data ../shared/data --out pack/ [--face-size 64]
    python benchmarks/pack_data.py --verify DIR --manifest pack/manifest.json   # after unpacking

The device call carries at most 64 MiB (working tree + carried paths) and cannot see
../shared/data. This writes OUT/fer2013_ssl_pack.tar.gz and OUT/manifest.json:

- fer2013/{train,val}/<class>/*.jpg: the same folder tree, JPEG bytes unchanged;
- unlabeled_faces/*.jpg: each face converted to grayscale and resized to --face-size
  (the way semifer's decoder does it: PIL "L", bilinear, reducing_gap 3), re-encoded as
  JPEG (--face-quality, optimized Huffman tables). The benchmark reads 1 channel anyway.

Why gzip and not a plain tar: a tar member takes a 512-byte header and pads its data to a
multiple of 512 bytes, ~800 bytes per file, i.e. ~32 MiB for 42,000 images of ~1.4 KB.
gzip removes the padding and the headers, and also most of the JPEG header (quantisation
and Huffman tables), which repeats in every one of these tiny files. Unpacking takes ~1 s.
The archive is deterministic (sorted members, mtime 0, uid 0), so its sha256 is stable.

After packing the archive is unpacked into a temporary folder and checked (image count per
class and a digest of the FER2013 JPEG bytes, against the manifest); --verify does the same
check on a folder unpacked elsewhere. Exit code 1 on any mismatch or when the archive is
larger than --max-mib.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

ARCHIVE = "fer2013_ssl_pack.tar.gz"
MANIFEST = "manifest.json"
SPLITS = ("fer2013/train", "fer2013/val")
FACES = "unlabeled_faces"
IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def _images(root: Path) -> list[Path]:
    """Image files under root, recursively, sorted by relative path; hidden parts skipped."""
    return sorted((p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXT
                   and not any(part.startswith(".") for part in p.relative_to(root).parts)),
                  key=lambda p: p.relative_to(root).as_posix())


def _counts(data: Path) -> dict:
    """{split: {class: n}} for FER2013 and {unlabeled_faces: n}, counted on disk."""
    out: dict = {}
    for split in SPLITS:
        per = {}
        for d in sorted(p for p in (data / split).iterdir() if p.is_dir()):
            per[d.name] = len(_images(d))
        out[split] = per
    out[FACES] = len(_images(data / FACES))
    return out


def _fer_digest(data: Path) -> str:
    """sha256 over (relative path, sha256 of the bytes) of every FER2013 image, in sorted order."""
    h = hashlib.sha256()
    for split in SPLITS:
        root = data / split
        for p in _images(root):
            h.update(f"{split}/{p.relative_to(root).as_posix()}\0".encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _face_jpeg(path: Path, size: int, quality: int) -> bytes:
    with Image.open(path) as im:
        im = im.convert("L")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR, reducing_gap=3.0)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality, optimize=True)
        return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(payload), 0, 0o644, 0, 0
    tar.addfile(info, io.BytesIO(payload))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(root: Path, manifest: dict) -> list[str]:
    """Differences between an unpacked folder and the manifest (empty = identical)."""
    problems = []
    got = _counts(root)
    for key, want in manifest["counts"].items():
        if got.get(key) != want:
            problems.append(f"{key}: manifest {want}, unpacked {got.get(key)}")
    digest = _fer_digest(root)
    if digest != manifest["fer2013_digest"]:
        problems.append(f"FER2013 bytes differ: digest {digest[:16]} != manifest {manifest['fer2013_digest'][:16]}")
    return problems


def _extract(archive: Path, dest: Path) -> None:
    with tarfile.open(archive, "r:gz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # Python < 3.11.4: our own archive, names checked when it was written
            tar.extractall(dest)


def pack(data: Path, out: Path, face_size: int, quality: int, level: int) -> dict:
    for sub in (*SPLITS, FACES):
        if not (data / sub).is_dir():
            raise SystemExit(f"no {data / sub} (see ../shared/data/README.md)")
    out.mkdir(parents=True, exist_ok=True)
    archive = out / ARCHIVE
    tmp = out / (ARCHIVE + ".tmp")
    t0 = time.perf_counter()
    fer_bytes = face_bytes = 0
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=level,
                                               mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for split in SPLITS:
            root = data / split
            for p in _images(root):
                payload = p.read_bytes()
                fer_bytes += len(payload)
                _add(tar, f"{split}/{p.relative_to(root).as_posix()}", payload)
        faces = _images(data / FACES)
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
            encoded = pool.map(lambda p: _face_jpeg(p, face_size, quality), faces, chunksize=64)
            for p, payload in zip(faces, encoded):
                face_bytes += len(payload)
                _add(tar, f"{FACES}/{p.relative_to(data / FACES).with_suffix('.jpg').as_posix()}", payload)
    os.replace(tmp, archive)
    manifest = {
        "archive": ARCHIVE, "bytes": archive.stat().st_size, "sha256": _sha256(archive),
        "source": str(data), "face_size": face_size, "face_quality": quality, "gzip_level": level,
        "counts": _counts(data), "fer2013_digest": _fer_digest(data),
        "payload_bytes": {"fer2013": fer_bytes, FACES: face_bytes},
        "unpack": f"mkdir -p DIR && tar -xzf {ARCHIVE} -C DIR  # then --data DIR",
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"packed in {time.perf_counter() - t0:.0f} s: FER2013 {fer_bytes / 2**20:.1f} MiB of JPEG bytes, "
          f"{manifest['counts'][FACES]} faces at {face_size} px {face_bytes / 2**20:.1f} MiB")
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--out", type=Path, default=Path("pack"))
    ap.add_argument("--face-size", type=int, default=64)
    ap.add_argument("--face-quality", type=int, default=90)
    ap.add_argument("--gzip-level", type=int, default=9)
    ap.add_argument("--max-mib", type=float, default=60.0, help="fail if the archive is larger")
    ap.add_argument("--no-check", action="store_true", help="skip the unpack-and-compare check after packing")
    ap.add_argument("--verify", type=Path, metavar="DIR", help="only check an unpacked folder against --manifest")
    ap.add_argument("--manifest", type=Path, help="manifest.json for --verify (default OUT/manifest.json)")
    a = ap.parse_args()

    if a.verify is not None:
        manifest = json.loads((a.manifest or a.out / MANIFEST).read_text())
        problems = verify(a.verify, manifest)
        for p in problems:
            print(f"MISMATCH {p}")
        c = manifest["counts"]
        print("FAILED" if problems else f"ok: {a.verify} holds {sum(c['fer2013/train'].values())} train, "
              f"{sum(c['fer2013/val'].values())} val and {c[FACES]} unlabeled images, FER2013 bytes identical")
        sys.exit(1 if problems else 0)

    manifest = pack(a.data, a.out, a.face_size, a.face_quality, a.gzip_level)
    size = manifest["bytes"]
    print(f"{a.out / ARCHIVE}: {size:,} bytes = {size / 2**20:.2f} MiB, sha256 {manifest['sha256']}")
    print("counts: " + json.dumps(manifest["counts"]))
    ok = True
    if size > a.max_mib * 2**20:
        print(f"TOO LARGE: {size / 2**20:.2f} MiB > --max-mib {a.max_mib}")
        ok = False
    if not a.no_check:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="semifer-pack-") as d:
            _extract(a.out / ARCHIVE, Path(d))
            problems = verify(Path(d), manifest)
        for p in problems:
            print(f"MISMATCH {p}")
        print(f"round trip ({time.perf_counter() - t0:.0f} s): "
              + ("same images per class and identical FER2013 bytes" if not problems else "FAILED"))
        ok = ok and not problems
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
