#!/usr/bin/env bash
# One SST-2 run of WTA-CRS@0.3 at lr 2.2e-4 (every parameter; the study's setting, one thread)
# from the code of COMMIT, in a worktree under /tmp/bis: the bisection of ACCURACY.md's
# regression (tenth session). Appends "COMMIT SCORE" to /tmp/bis/scores.txt.
#
#   benchmarks/bisect_sampled_accuracy.sh COMMIT
c=$1
mkdir -p /tmp/bis
d=/tmp/bis/wt-$c
[ -d $d ] || git -C /work/main worktree add --detach $d $c >/dev/null 2>&1
extra=""
grep -q "sampled-lr" $d/src/wtacrs/cli/finetune.py 2>/dev/null && extra="--sampled-lr 1"
cd $d
OMP_NUM_THREADS=1 PYTHONPATH=$d/src /work/main/.venv/bin/python -m wtacrs.cli finetune --task sst2 --data-dir /work/shared/data/glue \
  --max-train-samples 2000 --max-length 64 --epochs 2 --method wtacrs --ratio 0.3 --lr 2.2e-4 --seed 0 \
  --output-dir /tmp/bis/out-$c --no-progress --overwrite $extra > /tmp/bis/log-$c.txt 2>&1
f=$(ls /tmp/bis/out-$c/sst2/*/*/seed0/results.json 2>/dev/null | head -1)
echo "$c $(/work/main/.venv/bin/python -c "import json;print(round(100*json.load(open('$f'))['score'],2))" 2>/dev/null || echo FAIL)" >> /tmp/bis/scores.txt
