#!/usr/bin/env bash
# Issue 16 on SST-2: the decoder's accuracy target (SmolLM2-135M with LoRA against LoRA + the
# best exact WTA-CRS recipe, same seeds) and the encoder side of the families' comparison
# (MODEL=all-minilm-l6-v2: full, LoRA, the best exact recipe). Both packaged offline; every
# setting `wtacrs finetune`'s default (base lr 5e-5, LoRA r 8 at 5e-4, the sampled layers at the
# measured per-layer rate) except the size: one epoch over 2,000 training sentences (63 steps
# of 32), max length 64, the full dev set. One run per (recipe, seed) argument pair, in order;
# run two lanes in parallel, one thread each. One OUT per model (a run is skipped when its recipe
# and seed have results in OUT).
#
#   GLUE=../shared/data/glue OUT=DIR/smollm2 benchmarks/families_sst2.sh lora 0 lora+wtacrs@0.3+companions+recompute+keep-gate 0
#   MODEL=all-minilm-l6-v2 GLUE=../shared/data/glue OUT=DIR/minilm benchmarks/families_sst2.sh full 0 lora 0
#   wtacrs report DIR/smollm2 DIR/minilm
set -u
GLUE=${GLUE:-../shared/data/glue}
MODEL=${MODEL:-smollm2-135m}
OUT=${OUT:-wtacrs-output/families-sst2/$MODEL}
mkdir -p "$OUT/logs"
while (($# >= 2)); do
  recipe=$1 seed=$2; shift 2
  if ls "$OUT"/sst2/*/"$recipe/seed$seed/results.json" >/dev/null 2>&1; then echo "skip $recipe seed$seed"; continue; fi
  echo "$(date -u +%FT%TZ) start $MODEL $recipe seed$seed"
  wtacrs finetune --task sst2 --data-dir "$GLUE" --model "$MODEL" --max-train-samples 2000 \
    --epochs 1 --max-length 64 --method "$recipe" --seed "$seed" \
    --output-dir "$OUT" --no-progress --overwrite > "$OUT/logs/$MODEL-$recipe-seed$seed.log" 2>&1
  echo "$(date -u +%FT%TZ) done $MODEL $recipe seed$seed (exit $?)"
  rm -rf "$OUT"/sst2/*/"$recipe/seed$seed"/checkpoint-*
done
