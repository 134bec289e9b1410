"""Demo speed alone and beside one busy process, with torch's default threads and with semifer's choice.

    python benchmarks/threads_demo.py [--steps 30] [--algorithm dtm] [--out runs/threads]

"before" = torch's default (one thread per CPU: ``--threads <cpu count>``, what semifer did
before issue 13); "after" = semifer's default (the allowed CPUs not busy with other work).
"beside busy" starts one pure-Python busy loop (one core) for the run. Prints a Markdown table
of train seconds and the threads each run used (docs/performance.md). Not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def one(out: Path, steps: int, algorithm: str, threads: int | None, busy: bool) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        if hog is not None:
            time.sleep(1.0)  # let it take its core
        cmd = [sys.executable, "-m", "semifer.cli", "demo", "--algorithms", algorithm, "--steps", str(steps),
               "--out", str(out)] + (["--threads", str(threads)] if threads else [])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    finally:
        if hog is not None:
            hog.kill()
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    res = json.loads((out / "results.json").read_text())["algorithms"][algorithm]
    used = next((ln for ln in proc.stdout.splitlines() if "CPU thread" in ln), "")
    return {"train_s": res["train_wall_s"], "wall_s": wall, "test_macro_f1": res["macro_f1"], "threads": used}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--algorithm", default="dtm")
    ap.add_argument("--out", type=Path, default=Path("runs/threads"))
    a = ap.parse_args()
    cpus = os.cpu_count() or 1
    rows = []
    for label, threads in (("before (torch default)", cpus), ("after (semifer default)", None)):
        for busy in (False, True):
            r = one(a.out / f"{threads or 'auto'}_{int(busy)}", a.steps, a.algorithm, threads, busy)
            rows.append((label, "beside one busy process" if busy else "alone", r))
            print(json.dumps({"setting": label, "busy": busy, **r}), flush=True)
    print(f"\n{a.steps} steps of `semifer demo --algorithms {a.algorithm}` on {cpus} CPUs\n")
    print("| threads | machine | train s | test macro-F1 | chosen |")
    print("|---|---|---:|---:|---|")
    for label, where, r in rows:
        print(f"| {label} | {where} | {r['train_s']:.1f} | {r['test_macro_f1']:.3f} | {r['threads']} |")


if __name__ == "__main__":
    main()
