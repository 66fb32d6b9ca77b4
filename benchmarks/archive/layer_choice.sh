#!/usr/bin/env bash
# SST-2, the study's setting, with the current code (position prior on, unlike the SST-2 table's
# snapshot 5883018): WTA-CRS@0.3 sampling every linear layer (our default) against the paper's
# GLUE choice, query/key/value exact (`--target-modules output.dense intermediate.dense`).
# Does the gap come from sampling q/k/v? (ACCURACY.md, "Which layers to sample".)
#
#   GLUE=../shared/data/glue benchmarks/archive/layer_choice.sh
#   wtacrs report wtacrs-output/layer-choice
set -u
GLUE=${GLUE:-../shared/data/glue}
OUT=${OUT:-wtacrs-output/layer-choice}
mkdir -p "$OUT/logs"

run() {  # label seed [finetune flags]
  local label=$1 seed=$2; shift 2
  if ls "$OUT"/sst2/*/"$label/seed$seed/results.json" >/dev/null 2>&1; then echo "skip $label seed$seed"; return; fi
  echo "$(date -u +%FT%TZ) start $label seed$seed"
  wtacrs finetune --task sst2 --data-dir "$GLUE" --max-train-samples 2000 --max-length 64 --epochs 2 \
    --method wtacrs --ratio 0.3 --lr 1e-4 --seed "$seed" --output-dir "$OUT" --no-progress --overwrite "$@" \
    > "$OUT/logs/$label-seed$seed.log" 2>&1
  echo "$(date -u +%FT%TZ) done  $label seed$seed (exit $?)"
}

for seed in 0 1 2; do
  run wtacrs@0.3 "$seed"
  run wtacrs@0.3+targets=output.dense,intermediate.dense "$seed" --target-modules output.dense intermediate.dense
done
