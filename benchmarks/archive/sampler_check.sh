#!/usr/bin/env bash
# Does the current sampler train as the code of 2026-11-27 (b0b3e7c–06ce763) did? ACCURACY.md "Same code, one learning
# rate" measured WTA-CRS@0.3 at lr 2.2e-4 (every parameter; snapshot b0b3e7c-06ce763) at
# 83.03 +- 0.31 on SST-2; since then the draws became fixed-shape with replacement and
# counter-keyed (issue 15). The same runs on the current code.
#
#   GLUE=../shared/data/glue benchmarks/archive/sampler_check.sh
set -u
GLUE=${GLUE:-../shared/data/glue}
OUT=${OUT:-wtacrs-output/sampler-check}
mkdir -p "$OUT/logs"

. "$(dirname "$0")/../sst2_run.sh"

for seed in 0 1 2; do run wtacrs 0.3 2.2e-4 "$seed"; done
