#!/usr/bin/env bash
# Issue 3: the FER2013 SSL benchmark's "gpu" config (8 runs, ~6 min on an H100) in ONE device call
# of at most 8 minutes (docs/gpu_runbook.md). Needs the carried pack/ from benchmarks/pack_data.py.
#
#   OUT=/some/dir bash benchmarks/gpu_fer2013.sh
#
# Writes to $OUT, flat (a device call brings back at most 8 files): env.txt (GPU, torch, commit),
# stages.txt (seconds per stage), fer2013_gpu.log (the benchmark's output), results.json (exactly
# benchmarks/fer2013_ssl.py's DIR/results.json; absent if the time limit cut the benchmark off),
# runs.tar.gz (each run's metrics.jsonl, config.yaml and per-run results.json; also the runs a cut-off
# benchmark finished), gpu_util.csv (nvidia-smi every 5 s). Checkpoints stay on the machine.
# Environment: BUDGET_S (whole script, default 480), CONFIG (default gpu; smoke checks the path on a
# CPU), PACK (default pack), DATA_DIR / RUN_DIR (default /tmp/...), PYTHON.
set -u
: "${OUT:?set OUT to the output directory}"
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
# The device image's python3 holds torch (not the pinned 2.14.1: no registry there, and its wheels are
# far over the 64 MiB a call carries); semifer runs from src/, its other needs are in that image too.
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
BUDGET_S=${BUDGET_S:-480}
CONFIG=${CONFIG:-gpu}
PACK=${PACK:-pack}
DATA_DIR=${DATA_DIR:-/tmp/semifer_fer2013_data}
RUN_DIR=${RUN_DIR:-/tmp/semifer_fer2013_$CONFIG}
mkdir -p "$OUT"
start=$(date +%s)
last=$start
stage() {  # stage NAME: seconds since the previous stage, and in all
  local now; now=$(date +%s)
  echo "== $1: $((now - last)) s (total $((now - start)) s)" | tee -a "$OUT/stages.txt"
  last=$now
}

# 0. Environment; fail fast if semifer cannot import against this torch.
{ nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import sys, torch, torchvision; print('python', sys.version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
  "$PY" -c "import semifer.engine, semifer.ssl, yaml, PIL, tqdm; print('semifer imports ok')"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?') config $CONFIG budget ${BUDGET_S} s"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
grep -q "semifer imports ok" "$OUT/env.txt" || { echo "semifer does not import here; stopping"; exit 2; }
stage "environment"

# 1. Unpack the carried archive and check it against its manifest (counts per class, FER2013 bytes).
if [ ! -f "$PACK/fer2013_ssl_pack.tar.gz" ]; then
  echo "no $PACK/fer2013_ssl_pack.tar.gz: run benchmarks/pack_data.py and carry pack"; exit 2
fi
rm -rf "$DATA_DIR" && mkdir -p "$DATA_DIR"
tar -xzf "$PACK/fer2013_ssl_pack.tar.gz" -C "$DATA_DIR" || { echo "unpacking failed"; exit 2; }
"$PY" benchmarks/pack_data.py --verify "$DATA_DIR" --manifest "$PACK/manifest.json" || exit 2
stage "unpack + verify"

# 2. The benchmark, under what is left of the budget (20 s kept for collecting). A RUN_DIR left by an
#    earlier call on the same warm machine is resumed run by run (finished runs are not redone).
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 > "$OUT/gpu_util.csv" 2>/dev/null &
  smi=$!
fi
left=$(( BUDGET_S - ($(date +%s) - start) - 20 ))
set -o pipefail
timeout "$left" "$PY" benchmarks/fer2013_ssl.py --config "$CONFIG" --data "$DATA_DIR" --out "$RUN_DIR" 2>&1 \
  | tr '\r' '\n' | tee "$OUT/fer2013_gpu.log"
rc=$?
set +o pipefail
[ -n "${smi:-}" ] && kill "$smi" 2>/dev/null
echo "benchmark rc=$rc (124 = cut off after ${left} s)" | tee -a "$OUT/stages.txt"
stage "benchmark"

# 3. Collect: results.json as the script writes it; the per-run files in one archive.
[ -f "$RUN_DIR/results.json" ] && cp "$RUN_DIR/results.json" "$OUT/results.json"
(cd "$RUN_DIR" 2>/dev/null && find . -mindepth 3 -maxdepth 3 \( -name metrics.jsonl -o -name config.yaml \
  -o -name results.json \) | sort | tar -czf "$OUT/runs.tar.gz" -T -) || echo "no run files to collect"
if [ ! -f "$OUT/results.json" ]; then  # cut off: the finished runs' own results.json
  echo "no results.json (benchmark rc=$rc); runs that finished:"
  "$PY" - "$RUN_DIR" <<'EOF'
import json, sys
from pathlib import Path
print("| setting | algorithm | macro-F1 (8) | accuracy | steps | best step | wall s |\n|---|---|---:|---:|---:|---:|---:|")
for f in sorted(Path(sys.argv[1]).glob("*/*/results.json")):
    r = json.loads(f.read_text())
    print(f"| {f.parent.parent.name} | {f.parent.name} | {r['macro_f1']:.4f} | {r['accuracy']:.4f} | {r['steps']} "
          f"| {r['best_step']} | {r['wall_s']:.0f} |")
EOF
fi
stage "collect"
ls -l "$OUT"
exit "$rc"
