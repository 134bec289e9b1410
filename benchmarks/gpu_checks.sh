#!/usr/bin/env bash
# Issue 6 GPU figures in ONE call of at most 8 minutes (every step has its own timeout, 450 s in all).
#
#   OUT=/some/dir bash benchmarks/gpu_checks.sh
#
# Writes $OUT/env.txt (GPU, torch), $OUT/pytest.txt (CUDA-only pipeline tests),
# $OUT/throughput.json + throughput.log (resnet18 and ir50 at 112 px, device cuda) and,
# if that finished in time, $OUT/compile/throughput.json (resnet18 with torch.compile).
# Commit $OUT/throughput.json as docs/results/throughput-<h100|h200>.json (docs/performance.md).
set -u
: "${OUT:?set OUT to the output directory}"
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
mkdir -p "$OUT"
start=$(date +%s)

{ nvidia-smi || true
  "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"
  git rev-parse HEAD 2>/dev/null || true
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. Tests that only run with CUDA (pinned in-memory batches) plus the fused-optimizer round trip.
timeout 50 "$PY" -m pytest -q -x tests/test_device_pipeline.py -k "not compile" > "$OUT/pytest.txt" 2>&1
echo "pytest rc=$? ($(tail -n 1 "$OUT/pytest.txt"))"

# 2. The benchmark proper: ~80 s per backbone at 15 s per rate (rates + warm-up + start-up).
timeout 270 "$PY" benchmarks/throughput.py --out "$OUT" --device cuda --seconds 15 \
    --backbones resnet18,ir50 --size 112 2>&1 | tee "$OUT/throughput.log"
echo "throughput rc=${PIPESTATUS[0]} after $(( $(date +%s) - start )) s"

# 3. Only if time is left: resnet18 with torch.compile (compiling takes a minute or two).
left=$(( 440 - ($(date +%s) - start) ))
if [ "$left" -gt 90 ]; then
  timeout "$left" "$PY" benchmarks/throughput.py --out "$OUT/compile" --device cuda --seconds 8 \
      --backbones resnet18 --size 112 --compile 2>&1 | tee "$OUT/compile.log"
  echo "compile rc=${PIPESTATUS[0]}"
else
  echo "skipping the --compile run: ${left} s left"
fi
echo "total $(( $(date +%s) - start )) s"
