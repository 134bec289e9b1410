#!/usr/bin/env bash
# The default bundled model, fer2013-cnn32x2, from nothing, in one command (issue 14; docs/models.md):
#
#   bash benchmarks/train_bundled_pair.sh          # about 2 hours on 2 cores: start it first in a session
#
# 1. trains its two members at once, one thread each (116 minutes on this 2-core machine);
#    each run resumes from its run directory (runs/bundled_fer2013_wide2, _wide3) if it exists;
# 2. detects the held-out faces pasted into photos once (benchmarks/pasted_faces.py --split);
# 3. packs the pair: member weights, mirror averaging and the logit adjustment chosen on the
#    held-out split only, scored on fer2013/val once, written to src/semifer/bundled/NAME.pt with
#    its card (docs/results/bundled_NAME.json).
# Override with A=CONFIG B=CONFIG NAME=NAME WEIGHTS=int8|float16.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SEMIFER=${SEMIFER:-.venv/bin/semifer}
A=${A:-configs/bundled_fer2013_wide2.yaml}
B=${B:-configs/bundled_fer2013_wide3.yaml}
NAME=${NAME:-fer2013-cnn32x2}
WEIGHTS=${WEIGHTS:-int8}
run_dir() { "$PY" -c "import sys; from semifer.config import load_config; print(load_config(sys.argv[1]).run.out)" "$1"; }
RUN_A=$(run_dir "$A")
RUN_B=$(run_dir "$B")
mkdir -p "$(dirname "$RUN_A")" "$(dirname "$RUN_B")" runs/pasted

# one thread each: two jobs on two cores (threads are not saved in the checkpoint, so a resume may change them)
OMP_NUM_THREADS=1 "$SEMIFER" train --config "$A" --threads 1 > "${RUN_A}.log" 2>&1 &
PID_A=$!
OMP_NUM_THREADS=1 "$SEMIFER" train --config "$B" --threads 1 > "${RUN_B}.log" 2>&1 || { kill "$PID_A" 2>/dev/null; exit 1; }
wait "$PID_A"

FACES="runs/pasted/heldout_${NAME}.npz"
"$PY" benchmarks/pasted_faces.py --split "$RUN_A/split.json" --cache "$FACES"
"$PY" benchmarks/train_bundled.py --config "$A" --name "$NAME" --ensemble "$RUN_A" "$RUN_B" \
    --pasted "$FACES" --weights "$WEIGHTS"
