#!/usr/bin/env bash
# On the lent GPU machine (no internet): install the carried wheels, then run the GPU benchmark.
# Prepare the carried folder on the development machine first: `make bench-gpu-prepare`.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=bench/work/gpu-carry
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$CARRY"/wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT_DIR=${OUT:-bench/results}
python3 -m bench.gpu --data "$CARRY/fmnist" --masters "$CARRY/glyph-masters.npz" \
    --roofline "$CARRY/mark_roofline.py" --out "$OUT_DIR" "$@"
