#!/usr/bin/env bash
# Issue 16's decoder accuracy target on SST-2: SmolLM2-135M (packaged, offline) with LoRA against
# LoRA + the best exact WTA-CRS recipe, same seeds, every setting `wtacrs finetune`'s default
# (LoRA r 8, base lr 5e-4, the sampled layers at the measured per-layer rate) except the size:
# one epoch over 2,000 training sentences (63 steps of 32), max length 64, the full dev set.
# One run per (recipe, seed) argument pair, in order; run two lanes in parallel, one thread each.
#
#   GLUE=../shared/data/glue OUT=DIR benchmarks/decoder_sst2.sh lora 0 lora+wtacrs@0.3+companions+recompute+keep-gate 0
#   wtacrs report DIR
set -u
GLUE=${GLUE:-../shared/data/glue}
OUT=${OUT:-wtacrs-output/decoder-sst2}
mkdir -p "$OUT/logs"
while (($# >= 2)); do
  recipe=$1 seed=$2; shift 2
  if ls "$OUT"/sst2/*/"$recipe/seed$seed/results.json" >/dev/null 2>&1; then echo "skip $recipe seed$seed"; continue; fi
  echo "$(date -u +%FT%TZ) start $recipe seed$seed"
  wtacrs finetune --task sst2 --data-dir "$GLUE" --model smollm2-135m --max-train-samples 2000 \
    --epochs 1 --max-length 64 --method "$recipe" --seed "$seed" \
    --output-dir "$OUT" --no-progress --overwrite > "$OUT/logs/$recipe-seed$seed.log" 2>&1
  echo "$(date -u +%FT%TZ) done $recipe seed$seed (exit $?)"
  rm -rf "$OUT"/sst2/*/"$recipe/seed$seed"/checkpoint-*
done
