#!/usr/bin/env bash
# Issue 19's one-epoch target: every example seen once, so every step is a first visit and the
# gradient-norm cache never helps. SST-2 in the study's setting (sst2_run.sh) but one epoch over
# 4,000 sentences (the same 126 steps as two epochs over 2,000), full fine-tuning against
# WTA-CRS@0.3 with the default measured per-layer learning rate, both from base rate 1e-4.
#
#   GLUE=../shared/data/glue OUT=DIR benchmarks/one_epoch.sh SEED...   # one lane; run two in parallel
set -u
GLUE=${GLUE:-../shared/data/glue}
export OUT=${OUT:-wtacrs-output/one-epoch} TRAIN=4000 EPOCHS=1 SAMPLED_LR=measured-per-layer
mkdir -p "$OUT/logs"
. "$(dirname "$0")/sst2_run.sh"
for seed in "$@"; do
  run full 1 1e-4 "$seed"
  run wtacrs 0.3 1e-4 "$seed"
done
