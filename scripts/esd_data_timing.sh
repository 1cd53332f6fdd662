#!/bin/bash
# Same as esdx_time.sh, but old and new at the same time (one thread each), so both see the same machine load.
# Usage: git worktree add /work/wt-old 28ed309; bash scripts/esd_data_timing.sh (paths below are this machine's).
ARGS="--concept trouser --method esd-x --eval-images 8 --no-progress --overwrite"
run() {
  which=$1; dir=$2
  rm -rf /tmp/bench/cache2-$which; cd $dir
  start=$(date +%s.%N)
  ERASE_CACHE=/tmp/bench/cache2-$which OMP_NUM_THREADS=1 /work/main/.venv/bin/python -c "
import sys; sys.path.insert(0, '.')
from erase.train import main; main(sys.argv[1:])" $ARGS --output-dir /tmp/bench/esdx2-$which > /tmp/bench/esdx2-$which.log 2>&1
  end=$(date +%s.%N)
  echo "$which: $(echo "$end - $start" | bc) s; $(grep -E 'wall time' /tmp/bench/esdx2-$which.log); cache files: $(ls /tmp/bench/cache2-$which/data | wc -l)"
}
run old /work/wt-old & run new /work/main & wait
