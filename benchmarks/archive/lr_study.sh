#!/usr/bin/env bash
# Does WTA-CRS's SST-2 gap come from a smaller effective learning rate? (ACCURACY.md, "Learning
# rate".) Sampling noise with relative variance v ≈ 1.2 per layer (model_unbiasedness.py) enters
# Adam's second moment and shrinks a sampled weight's steps by about 1/√(1+v) ≈ 0.67. Prediction:
# full fine-tuning at lr 0.67e-4 lands near WTA-CRS@0.3 at 1e-4, and WTA-CRS@0.3 at 1.5e-4
# recovers part of its gap, measured against full fine-tuning at 1.5e-4 too; then both at
# 2.2e-4, WTA-CRS at 3.2e-4, and top-k, CRS and WTA-CRS@0.1 at larger learning rates.
# The study's SST-2 setting otherwise (benchmarks/accuracy_study.sh); one folder per lr.
#
#   GLUE=../shared/data/glue benchmarks/archive/lr_study.sh
#   wtacrs report wtacrs-output/lr-study/lr1.5e-4 --output-dir wtacrs-output/lr-study/lr1.5e-4/report
set -u
GLUE=${GLUE:-../shared/data/glue}
OUT=${OUT:-wtacrs-output/lr-study}
mkdir -p "$OUT/logs"

. "$(dirname "$0")/../sst2_run.sh"

for seed in 0 1 2; do
  run wtacrs 0.3 1.5e-4 "$seed"
  run full 1 6.7e-5 "$seed"
  run full 1 1.5e-4 "$seed"
done
# then: does WTA-CRS keep gaining at a higher lr, and where is full fine-tuning's best?
for seed in 0 1 2; do
  run wtacrs 0.3 2.2e-4 "$seed"
  run full 1 2.2e-4 "$seed"
done
# full fine-tuning peaked at 1.5e-4; WTA-CRS was still gaining at 2.2e-4
for seed in 0 1 2; do run wtacrs 0.3 3.2e-4 "$seed"; done
# the other sampled methods of the targets at larger learning rates: top-k (less variance, so a
# smaller best lr expected), CRS and WTA-CRS@0.1 (more variance, larger)
for seed in 0 1 2; do
  run topk 0.3 1.5e-4 "$seed"; run topk 0.3 2.2e-4 "$seed"
  run crs 0.3 2.2e-4 "$seed"; run wtacrs 0.1 2.2e-4 "$seed"
done
