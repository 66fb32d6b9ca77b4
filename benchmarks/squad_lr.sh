#!/usr/bin/env bash
# Is SQuAD's WTA-CRS gap (F1 28.55 vs 44.77 at lr 1e-4) also a learning-rate effect? The study's
# SQuAD setting (benchmarks/accuracy_study.sh) at the learning rates that were best on SST-2
# (benchmarks/lr_study.sh): WTA-CRS@0.3 at 2.2e-4, then full fine-tuning at 1.5e-4; seed 0, or
# the seeds in SEEDS. One folder per learning rate under OUT.
#
#   SQUAD=../shared/data/squad/dev-v1.1.json benchmarks/squad_lr.sh
#   SEEDS="0 1 2" OUT=wtacrs-output/squad-fixed benchmarks/squad_lr.sh   # ACCURACY.md, "SQuAD"
set -u
SQUAD=${SQUAD:-../shared/data/squad/dev-v1.1.json}
OUT=${OUT:-wtacrs-output/squad-lr}
mkdir -p "$OUT/logs"

run() {  # method ratio lr seed
  local method=$1 ratio=$2 lr=$3 seed=$4 label=$1
  [[ $method == wtacrs ]] && label="$method@$ratio"
  if ls "$OUT/lr$lr"/squad/*/"$label/seed$seed/results.json" >/dev/null 2>&1; then
    echo "skip $label lr$lr seed$seed"; return
  fi
  echo "$(date -u +%FT%TZ) start $label lr$lr seed$seed"
  wtacrs finetune --task squad --data-dir "$SQUAD" --max-train-samples 1500 --max-length 192 --doc-stride 64 \
    --epochs 2 --batch-size 16 --method "$method" --ratio "$ratio" --lr "$lr" --seed "$seed" \
    --output-dir "$OUT/lr$lr" --no-progress --overwrite > "$OUT/logs/$label-lr$lr-seed$seed.log" 2>&1
  echo "$(date -u +%FT%TZ) done  $label lr$lr seed$seed (exit $?)"
}

for seed in ${SEEDS:-0}; do
  run wtacrs 0.3 2.2e-4 "$seed"
  run full 1 1.5e-4 "$seed"
done
