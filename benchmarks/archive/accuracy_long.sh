#!/usr/bin/env bash
# Does WTA-CRS's gap to full fine-tuning close with more steps? The study's SST-2 setting
# (benchmarks/accuracy_study.sh: batch 32, max length 64, 2 epochs, lr 1e-4, LoRA 5e-4) with a
# 4x larger training subset: 8,000 sentences, 500 optimiser steps instead of 126. Seed 0.
#
#   GLUE=../shared/data/glue benchmarks/archive/accuracy_long.sh
set -u
GLUE=${GLUE:-../shared/data/glue}
OUT=${OUT:-wtacrs-output/accuracy-long}
mkdir -p "$OUT/logs"
COMMON=(--task sst2 --data-dir "$GLUE" --max-train-samples 8000 --max-length 64 --epochs 2 --seed 0
        --output-dir "$OUT" --no-progress --resume)
for spec in "full" "wtacrs --lr 1e-4" "lora" "lora+wtacrs"; do
  set -- $spec
  method=$1; shift
  [[ $method == full ]] && set -- --lr 1e-4
  echo "$(date -u +%FT%TZ) start $method"
  nice -n 10 wtacrs finetune "${COMMON[@]}" --method "$method" "$@" > "$OUT/logs/$method.log" 2>&1
  echo "$(date -u +%FT%TZ) done  $method (exit $?)"
done
