#!/usr/bin/env bash
# make demo-classifier: forget the "trouser" class of Fashion-MNIST with SalUn and compare with retraining.
# Scale: CIFAR-stem ResNet-18 at width 8 (0.18 M parameters), the full 60k/10k Fashion-MNIST, seed 0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${DEMO_DIR:-runs/demo}
FORGET=${DEMO_FORGET:-class:1}
COMMON=(--forget "$FORGET" --seed 0)
mkdir -p "$OUT"
start=$(date +%s)

if [ ! -f "$OUT/original/run.json" ]; then
  echo "== 1/4 training the original model (the retrain recipe on all 60k images)"
  $PY -m erase.classifier.pretrain --width 8 --epochs 3 --output-dir "$OUT/original" --overwrite
fi
echo "== 2/4 retraining without the forget set (the gold standard)"
$PY erase/train.py --method retrain --original "$OUT/original" --epochs 3 "${COMMON[@]}" --output-dir "$OUT/retrain" --overwrite
echo "== 3/4 SalUn: random labels on the salient half of the weights"
$PY erase/train.py --method salun --original "$OUT/original" "${COMMON[@]}" --epochs 3 --retain-epochs 0.25 \
  --lr 0.013 --output-dir "$OUT/salun" --overwrite
echo "== 4/4 report"
$PY erase/evaluate.py "$OUT/salun" --retrain "$OUT/retrain" --output "$OUT/report"
echo "demo wall time: $(( $(date +%s) - start )) s (outputs in $OUT/)"
