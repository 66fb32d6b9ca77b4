#!/usr/bin/env bash
# Is SQuAD's WTA-CRS gap (F1 28.55 vs 44.77 at lr 1e-4) also a learning-rate effect? The study's
# SQuAD setting (benchmarks/accuracy_study.sh), seed 0, at the learning rates that were best on
# SST-2 (benchmarks/lr_study.sh): WTA-CRS@0.3 at 2.2e-4, then full fine-tuning at 1.5e-4.
#
#   SQUAD=../shared/data/squad/dev-v1.1.json benchmarks/squad_lr.sh
set -u
SQUAD=${SQUAD:-../shared/data/squad/dev-v1.1.json}
OUT=${OUT:-wtacrs-output/squad-lr}
mkdir -p "$OUT/logs"

run() {  # method ratio lr
  local method=$1 ratio=$2 lr=$3 label=$1
  [[ $method == wtacrs ]] && label="$method-$ratio"
  if ls "$OUT/lr$lr"/squad/*/"$label/seed0/results.json" >/dev/null 2>&1; then echo "skip $label lr$lr"; return; fi
  echo "$(date -u +%FT%TZ) start $label lr$lr"
  wtacrs finetune --task squad --data-dir "$SQUAD" --max-train-samples 1500 --max-length 192 --doc-stride 64 \
    --epochs 2 --batch-size 16 --method "$method" --ratio "$ratio" --lr "$lr" --seed 0 \
    --output-dir "$OUT/lr$lr" --no-progress --overwrite > "$OUT/logs/$label-lr$lr.log" 2>&1
  echo "$(date -u +%FT%TZ) done  $label lr$lr (exit $?)"
}

run wtacrs 0.3 2.2e-4
run full 1 1.5e-4
