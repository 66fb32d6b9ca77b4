#!/usr/bin/env bash
# Backward draws (WTACRSConfig.backward_draws, on by default): inside recomputed sub-blocks the
# sampled layers draw their rows in backward with the true ||dY_i||. Accuracy of the best exact
# recipe, wtacrs@RATIO+recompute+recompute-attention, at the default measured per-layer rate from
# base 1e-4, in the study's settings (accuracy_study.sh): SST-2 (2,000 sentences, length 64,
# 2 epochs) or RTE (full train, length 128, 3 epochs). With backward_draws=False that recipe's
# gradients are bitwise plain wtacrs@RATIO's, so the draws-in-forward arm is sst2_run.sh's
# `run wtacrs RATIO 1e-4 SEED` (SAMPLED_LR=measured-per-layer). RECIPE=full runs the reference.
#
#   GLUE=../shared/data/glue OUT=DIR [TASK=sst2|rte RATIO=0.3 RECIPE=... TRAIN=2000 EPOCHS=2] \
#     benchmarks/backward_draws.sh SEED...   # one lane
set -u
GLUE=${GLUE:-../shared/data/glue}
OUT=${OUT:-wtacrs-output/backward-draws}
TASK=${TASK:-sst2}
RECIPE=${RECIPE:-wtacrs@${RATIO:-0.3}+recompute+recompute-attention}
case $TASK in
  sst2) TASK_ARGS="--max-train-samples ${TRAIN:-2000} --max-length 64 --epochs ${EPOCHS:-2}" ;;
  rte) TASK_ARGS="--max-length 128 --epochs ${EPOCHS:-3}" ;;
  *) echo "TASK must be sst2 or rte, not '$TASK'" >&2; exit 2 ;;
esac
mkdir -p "$OUT/logs"
for seed in "$@"; do
  if ls "$OUT/$TASK"/*/"$RECIPE/seed$seed/results.json" >/dev/null 2>&1; then echo "skip seed$seed"; continue; fi
  echo "$(date -u +%FT%TZ) start $TASK $RECIPE seed$seed"
  wtacrs finetune --task "$TASK" --data-dir "$GLUE" $TASK_ARGS --method "$RECIPE" --lr 1e-4 \
    --seed "$seed" --output-dir "$OUT" --no-progress --overwrite > "$OUT/logs/$TASK-$RECIPE-seed$seed.log" 2>&1
  echo "$(date -u +%FT%TZ) done  $TASK $RECIPE seed$seed (exit $?)"
done
