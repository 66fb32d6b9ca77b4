#!/usr/bin/env bash
# Backward draws (WTACRSConfig.backward_draws, on by default): inside recomputed sub-blocks the
# sampled layers draw their rows in backward with the true ||dY_i||. Accuracy of the best exact
# recipe, wtacrs@RATIO+recompute+recompute-attention, in the study's SST-2 setting (sst2_run.sh),
# default measured per-layer rate from base 1e-4. With backward_draws=False that recipe's
# gradients are bitwise plain wtacrs@RATIO's, so the draws-in-forward arm is sst2_run.sh's
# `run wtacrs RATIO 1e-4 SEED` (SAMPLED_LR=measured-per-layer).
#
#   GLUE=../shared/data/glue OUT=DIR [RATIO=0.3 TRAIN=2000 EPOCHS=2] benchmarks/backward_draws.sh SEED...   # one lane
set -u
GLUE=${GLUE:-../shared/data/glue}
OUT=${OUT:-wtacrs-output/backward-draws}
RECIPE=wtacrs@${RATIO:-0.3}+recompute+recompute-attention
mkdir -p "$OUT/logs"
for seed in "$@"; do
  if ls "$OUT"/sst2/*/"$RECIPE/seed$seed/results.json" >/dev/null 2>&1; then echo "skip seed$seed"; continue; fi
  echo "$(date -u +%FT%TZ) start $RECIPE seed$seed"
  wtacrs finetune --task sst2 --data-dir "$GLUE" --max-train-samples "${TRAIN:-2000}" --max-length 64 \
    --epochs "${EPOCHS:-2}" --method "$RECIPE" --lr 1e-4 --seed "$seed" --output-dir "$OUT" --no-progress \
    --overwrite > "$OUT/logs/seed$seed.log" 2>&1
  echo "$(date -u +%FT%TZ) done  $RECIPE seed$seed (exit $?)"
done
