#!/usr/bin/env bash
# make demo-attack: erase "trouser" from the bundled tiny SD with UCE (closed form, seconds), then attack the
# erased model with every registered attack on four prompts (the model's reduced budgets), offline, CPU.
# Ends with the ASR table, the attack grids and the model card's Robustness section.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
OUT=${DEMO_DIR:-runs/demo-attack-trouser}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc 2>/dev/null || echo 1)}
start=$(date +%s)
"$VENV/bin/python" erase/train.py --concept trouser --method uce --eval-images 8 --output-dir "$OUT" --overwrite \
  --no-progress
echo
# Ring-A-Bell keeps the concept's words out of its prompts, so a success cannot come from the word itself.
"$VENV/bin/python" erase/attack.py "$OUT" --attack all --limit 4 --overwrite \
  --set ring-a-bell.avoid-concept-words=true "$@"
echo
echo "attack grids: $OUT/attacks/*/grid.png   per-prompt tables: $OUT/attacks/*/table.md   card: $OUT/README.md"
echo "demo wall time: $(( $(date +%s) - start )) s"
