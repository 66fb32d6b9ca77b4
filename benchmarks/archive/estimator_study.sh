#!/usr/bin/env bash
# Priority sampling against WTA-CRS, CRS and top-k (ACCURACY.md, "Same code"): the study's SST-2 setting
# (2,000 sentences, 2 epochs, max length 64), each sampled method at lr 2.2e-4 (WTA-CRS@0.3's best
# in the lr study), all from one code version, which has the gradient-norm cache's position prior
# that the lr study's snapshot (5883018) predates. Full fine-tuning at its best lr (1.5e-4) once,
# to check that its lr-study numbers hold for this code (its path does not sample).
#
#   GLUE=../shared/data/glue benchmarks/archive/estimator_study.sh
#   wtacrs report wtacrs-output/estimator-study --output-dir wtacrs-output/estimator-study/report
# (one folder per learning rate: wtacrs-output/estimator-study/lr<LR>)
set -u
GLUE=${GLUE:-../shared/data/glue}
OUT=${OUT:-wtacrs-output/estimator-study}
mkdir -p "$OUT/logs"

. "$(dirname "$0")/../sst2_run.sh"

for seed in 0 1 2; do run priority 0.3 2.2e-4 "$seed"; run wtacrs 0.3 2.2e-4 "$seed"; done
run full 1 1.5e-4 0
for seed in 0 1 2; do run priority 0.1 2.2e-4 "$seed"; run wtacrs 0.1 2.2e-4 "$seed"; done
# the position prior changes the scores of every sampler: CRS and top-k from the same code and lr
for seed in 0 1 2; do run crs 0.3 2.2e-4 "$seed"; run topk 0.3 2.2e-4 "$seed"; done
# priority sampling has about half WTA-CRS's variance, so its best lr should be smaller: full's best
for seed in 0 1 2; do run priority 0.3 1.5e-4 "$seed"; done
# WTA-CRS@0.1 has more variance than @0.3, so its best lr should be larger still
for seed in 0 1 2; do run wtacrs 0.1 3.2e-4 "$seed"; done
