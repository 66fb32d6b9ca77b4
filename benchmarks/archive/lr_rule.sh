#!/usr/bin/env bash
# The measured learning-rate rule (issue 19; wtacrs.learning_rate): v, each sampled layer's
# first-visit relative gradient variance, measured before training instead of a per-task search.
# "measured-per-layer" trains each sampled layer at the base rate times sqrt(1 + v) (the theory's
# rule), "measured" every parameter at the base rate times sqrt(1 + median v). Both in the study's
# SST-2 setting (sst2_run.sh) at full fine-tuning's base rate there (1e-4), ratios 0.3 and 0.1,
# against full fine-tuning on the same code; then one epoch over twice the sentences.
#
#   GLUE=../shared/data/glue benchmarks/archive/lr_rule.sh
set -u
GLUE=${GLUE:-../shared/data/glue}
OUT=${OUT:-wtacrs-output/lr-rule}
ROOT=$OUT
mkdir -p "$OUT/logs"

. "$(dirname "$0")/../sst2_run.sh"

for seed in 0 1 2; do run full 1 1e-4 "$seed"; done
for rule in measured-per-layer measured; do
  export OUT=$ROOT/$rule
  mkdir -p "$OUT/logs"
  for seed in 0 1 2; do SAMPLED_LR=$rule run wtacrs 0.3 1e-4 "$seed"; done
  for seed in 0 1 2; do SAMPLED_LR=$rule run wtacrs 0.1 1e-4 "$seed"; done
done
# one epoch over twice the sentences (the same 126 steps): every step a first visit, the
# regime of issue 19's one-epoch target, where the cache never helps
export TRAIN=4000 EPOCHS=1 OUT=$ROOT/one-epoch
mkdir -p "$OUT/logs"
for seed in 0 1 2; do
  SAMPLED_LR=measured run wtacrs 0.3 1e-4 "$seed"
  run full 1 1e-4 "$seed"
done
