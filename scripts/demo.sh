#!/usr/bin/env bash
# make demo: erase "trouser" from the bundled tiny text-to-image Stable Diffusion model (offline, CPU),
# ending with the before/after grid, the model card and the metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
OUT=${DEMO_DIR:-runs/demo-trouser}
start=$(date +%s)
"$VENV/bin/accelerate" launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  erase/train.py --concept trouser --output-dir "$OUT" --overwrite "$@"
echo
echo "before/after grid: $OUT/grid.png   model card: $OUT/README.md   erased model: $OUT/model/"
echo "demo wall time: $(( $(date +%s) - start )) s"
