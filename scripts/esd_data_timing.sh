#!/bin/bash
# ESD-x on the bundled SD with an empty data cache, run by two checkouts at the same time (one thread each,
# so both see the same machine load): OLD generated 64 forget + 64 retain images ESD never reads, NEW does not.
#   git worktree add ../erase-old 28ed309 && bash scripts/esd_data_timing.sh ../erase-old .
set -euo pipefail
OLD=$(cd "${1:?old checkout}" && pwd); NEW=$(cd "${2:?new checkout}" && pwd)
PY=${PY:-$NEW/.venv/bin/python}
OUT=${OUT:-/tmp/esd-data-timing}
ARGS="--concept trouser --method esd-x --eval-images 8 --no-progress --overwrite"
run() {
  local which=$1 dir=$2
  rm -rf "$OUT/cache-$which"; mkdir -p "$OUT"
  local start end
  start=$(date +%s.%N)
  (cd "$dir" && ERASE_CACHE="$OUT/cache-$which" OMP_NUM_THREADS=1 "$PY" -c "
import sys; sys.path.insert(0, '.')
from erase.train import main; main(sys.argv[1:])" $ARGS --output-dir "$OUT/esdx-$which" > "$OUT/esdx-$which.log" 2>&1)
  end=$(date +%s.%N)
  echo "$which: $(echo "$end - $start" | bc) s; $(grep -E 'wall time' "$OUT/esdx-$which.log"); cache files: $(ls "$OUT/cache-$which/data" | wc -l)"
}
run old "$OLD" & run new "$NEW" & wait
