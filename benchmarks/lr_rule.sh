#!/usr/bin/env bash
# The measured learning-rate rule (issue 19; wtacrs.learning_rate): each sampled layer trains at
# the base rate times sqrt(1 + v), v its first-visit relative variance measured before training,
# instead of a per-task search. Checked in the study's SST-2 setting (sst2_run.sh) at the base
# rate full fine-tuning uses there (1e-4), at ratios 0.3 and 0.1, against full fine-tuning on the
# same code; ACCURACY.md's grid (lr_study.sh, fixed factors) is the comparison.
#
#   GLUE=../shared/data/glue benchmarks/lr_rule.sh
set -u
GLUE=${GLUE:-../shared/data/glue}
OUT=${OUT:-wtacrs-output/lr-rule}
mkdir -p "$OUT/logs"

. "$(dirname "$0")/sst2_run.sh"

for seed in 0 1 2; do
  SAMPLED_LR=measured run wtacrs 0.3 1e-4 "$seed"
  run full 1 1e-4 "$seed"
done
for seed in 0 1 2; do SAMPLED_LR=measured run wtacrs 0.1 1e-4 "$seed"; done
# one epoch over twice the sentences (the same 126 steps): every step a first visit, the
# regime of issue 19's one-epoch target, where the cache never helps
export TRAIN=4000 EPOCHS=1 OUT=$OUT/one-epoch
mkdir -p "$OUT/logs"
for seed in 0 1 2; do
  SAMPLED_LR=measured run wtacrs 0.3 1e-4 "$seed"
  run full 1 1e-4 "$seed"
done
