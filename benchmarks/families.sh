#!/usr/bin/env bash
# Issue 16's encoder-vs-decoder comparison and the decoder's accuracy targets: SmolLM2-135M
# (default MODEL) or MODEL=all-minilm-l6-v2, both packaged offline, one run per (recipe, seed)
# argument pair, in order; run two lanes in parallel, one thread each. One OUT per model and task
# (a run is skipped when its recipe and seed have results in OUT). Every setting is `wtacrs
# finetune`'s default (base lr 5e-5, LoRA r 8 at 5e-4, the sampled layers at the measured
# per-layer rate) except the size, one setting per TASK, the same for both families:
#   sst2  (default) one epoch over 2,000 training sentences (63 steps of 32), max length 64,
#         the full dev set;
#   rte   one epoch over 1,000 training pairs (32 steps of 32), max length 128 (86–87% of the
#         pairs fit), the full dev set (277);
#   squad one epoch over 800 training questions of the study's training articles (windows of
#         192 tokens, stride 64, batch 16), 600 questions of its held-out articles.
#
#   GLUE=../shared/data/glue OUT=DIR/smollm2 benchmarks/families.sh lora 0 lora+wtacrs@0.3+companions+recompute+keep-gate 0
#   MODEL=all-minilm-l6-v2 GLUE=../shared/data/glue OUT=DIR/minilm benchmarks/families.sh full 0 lora 0
#   TASK=rte GLUE=../shared/data/glue OUT=DIR/smollm2 benchmarks/families.sh full 0
#   TASK=squad SQUAD=../shared/data/squad/dev-v1.1.json OUT=DIR/smollm2 benchmarks/families.sh lora 0
#   wtacrs report DIR/smollm2 DIR/minilm
set -u
TASK=${TASK:-sst2}
MODEL=${MODEL:-smollm2-135m}
OUT=${OUT:-wtacrs-output/families-$TASK/$MODEL}
case $TASK in
  sst2) setting=(--data-dir "${GLUE:-../shared/data/glue}" --max-train-samples 2000 --epochs 1 --max-length 64) ;;
  rte) setting=(--data-dir "${GLUE:-../shared/data/glue}" --max-train-samples 1000 --epochs 1 --max-length 128) ;;
  squad) setting=(--data-dir "${SQUAD:-../shared/data/squad/dev-v1.1.json}" --max-train-samples 800 --epochs 1
                  --max-length 192 --doc-stride 64 --batch-size 16 --max-eval-samples 600) ;;
  *) echo "TASK must be sst2, rte or squad, not '$TASK'" >&2; exit 2 ;;
esac
mkdir -p "$OUT/logs"
while (($# >= 2)); do
  recipe=$1 seed=$2; shift 2
  if ls "$OUT/$TASK"/*/"$recipe/seed$seed/results.json" >/dev/null 2>&1; then echo "skip $recipe seed$seed"; continue; fi
  echo "$(date -u +%FT%TZ) start $MODEL $TASK $recipe seed$seed"
  wtacrs finetune --task "$TASK" --model "$MODEL" "${setting[@]}" --method "$recipe" --seed "$seed" \
    --output-dir "$OUT" --no-progress --overwrite > "$OUT/logs/$MODEL-$recipe-seed$seed.log" 2>&1
  echo "$(date -u +%FT%TZ) done $MODEL $TASK $recipe seed$seed (exit $?)"
  rm -rf "$OUT/$TASK"/*/"$recipe/seed$seed"/checkpoint-*
done
