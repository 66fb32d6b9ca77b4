#!/usr/bin/env bash
# One SST-2 run of WTA-CRS@0.3 at lr 2.2e-4 (every parameter; the study's setting, one thread)
# from the code of COMMIT, in a worktree under /tmp/bis: the bisection of ACCURACY.md's
# regression (2026-12-01, d4038d5). Appends "COMMIT seedSEED SCORE" to /tmp/bis/scores.txt.
#
#   benchmarks/archive/bisect_sampled_accuracy.sh COMMIT [SEED]   # SEED: 0 by default
set -u
c=$1 s=${2:-0}
mkdir -p /tmp/bis
d=/tmp/bis/wt-$c
[ -d "$d" ] || git -C "$(dirname "$0")/../.." worktree add --detach "$d" "$c" >/dev/null 2>&1
extra=""  # commits with the measured rule need it off: the rate as given
grep -q "sampled-lr" "$d/src/wtacrs/cli/finetune.py" && extra="--sampled-lr 1"
out=/tmp/bis/out-$c-s$s
cd "$d" && OMP_NUM_THREADS=1 PYTHONPATH=$d/src python -m wtacrs.cli finetune --task sst2 \
  --data-dir "${GLUE:-/work/shared/data/glue}" --max-train-samples 2000 --max-length 64 --epochs 2 \
  --method wtacrs --ratio 0.3 --lr 2.2e-4 --seed "$s" --output-dir "$out" --no-progress --overwrite $extra \
  > /tmp/bis/log-$c-s$s.txt 2>&1
f=$(ls "$out"/sst2/*/*/seed"$s"/results.json | head -1)
echo "$c seed$s $(python -c "import json; print(round(100 * json.load(open('$f'))['score'], 2))")" >> /tmp/bis/scores.txt
