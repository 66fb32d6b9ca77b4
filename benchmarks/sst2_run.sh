# Sourced by lr_study.sh and estimator_study.sh: `run METHOD RATIO LR SEED` trains one run in the
# accuracy study's SST-2 setting (2,000 sentences, 2 epochs, max length 64; TRAIN and EPOCHS
# change the first two) into "$OUT/lr<LR>",
# skipping a run that has its results.json; needs GLUE and OUT set and "$OUT/logs" present.
# SAMPLED_LR is --sampled-lr for sampling methods: 1 (the default here) trains them at LR itself,
# as the studies before the measured rule did; "measured" scales each sampled layer's rate.
run() {  # method ratio lr seed
  local method=$1 ratio=$2 lr=$3 seed=$4 label=$1
  [[ $method != full ]] && label="$method@$ratio"
  local out="$OUT/lr$lr"
  if ls "$out"/sst2/*/"$label/seed$seed/results.json" >/dev/null 2>&1; then echo "skip $label lr$lr seed$seed"; return; fi
  echo "$(date -u +%FT%TZ) start $label lr$lr seed$seed"
  wtacrs finetune --task sst2 --data-dir "$GLUE" --max-train-samples "${TRAIN:-2000}" --max-length 64 \
    --epochs "${EPOCHS:-2}" \
    --method "$method" --ratio "$ratio" --lr "$lr" --sampled-lr "${SAMPLED_LR:-1}" --seed "$seed" \
    --output-dir "$out" --no-progress \
    --overwrite > "$OUT/logs/$label-lr$lr-seed$seed.log" 2>&1
  echo "$(date -u +%FT%TZ) done  $label lr$lr seed$seed (exit $?)"
}
