#!/usr/bin/env bash
# Issue 19's "default learning rates, no per-task tuning" targets on tasks the rule was not
# fitted on: full fine-tuning against WTA-CRS, every setting at `wtacrs finetune`'s defaults (the
# task's base rate and epochs, the measured per-layer rule for the sampled runs).
#
#   GLUE=../shared/data/glue OUT=DIR benchmarks/default_rates.sh SEED...   # RTE, one lane
#   TASK=tweet_lm MODEL=smollm2-135m METHODS="full wtacrs@0.3" EXTRA="--max-train-samples 2000" \
#     OUT=DIR benchmarks/default_rates.sh SEED...   # the decoder's one-epoch causal-LM task
set -u
GLUE=${GLUE:-../shared/data/glue}
TASK=${TASK:-rte}
OUT=${OUT:-wtacrs-output/default-rates}
METHODS=${METHODS:-full wtacrs@0.3 wtacrs@0.1}
mkdir -p "$OUT/logs"
data=()
[[ $TASK != tweet_lm ]] && data=(--data-dir "$GLUE")
for seed in "$@"; do
  echo "$(date -u +%FT%TZ) start $TASK seed$seed"
  # shellcheck disable=SC2086  # METHODS and EXTRA are word lists
  wtacrs finetune --task "$TASK" ${MODEL:+--model "$MODEL"} "${data[@]}" --method $METHODS --seed "$seed" \
    --output-dir "$OUT" --no-progress ${EXTRA:-} > "$OUT/logs/$TASK-seed$seed.log" 2>&1
  echo "$(date -u +%FT%TZ) done  $TASK seed$seed (exit $?)"
done
