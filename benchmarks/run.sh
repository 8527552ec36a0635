#!/usr/bin/env bash
# Reproduces the table in benchmarks/README.md: tfpar against one device,
# MirroredStrategy and hand-written DTensor on a 4x2048 MLP, batch 256.
#
#   benchmarks/run.sh                        # the README's run (about 2 minutes on 2 cores)
#   benchmarks/run.sh --steps 5 --hidden 256 # a quick check (under a minute)
#
# Extra arguments go to `tfpar bench` (later values win). Writes
# bench.json, bench.png and bench.md under $OUT (default benchmarks/results).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
echo "machine: $(nproc) cores, $(uname -m); $("$PYTHON" -c 'import tensorflow as tf, keras; print("TF", tf.__version__, "Keras", keras.__version__)' 2>/dev/null)"
time "$PYTHON" -m tfpar bench \
    --hidden 2048 --layers 4 --batch 256 --steps 20 --warmup 2 \
    --json "$OUT/bench.json" --plot "$OUT/bench.png" --markdown "$OUT/bench.md" "$@"
echo "wrote $OUT/bench.json $OUT/bench.png $OUT/bench.md"
