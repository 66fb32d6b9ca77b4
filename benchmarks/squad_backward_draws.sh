#!/usr/bin/env bash
# Issue 19's SQuAD target at default rates: the best exact recipe (every sampled layer draws in
# backward) against full fine-tuning, in the study's SQuAD setting (benchmarks/squad_lr.sh: 1,500
# training questions of the articles not ≡ 4 mod 5, windows of 192 tokens, stride 64, 2 epochs,
# batch 16), base lr 1e-4 for both, the sampled layers at the default measured per-layer rates.
# One recipe per lane; each run's checkpoints are deleted once its results.json is written.
#
#   SQUAD=../shared/data/squad/dev-v1.1.json OUT=DIR benchmarks/squad_backward_draws.sh full 0 1 2
#   SQUAD=../shared/data/squad/dev-v1.1.json OUT=DIR benchmarks/squad_backward_draws.sh wtacrs@0.3+recompute+recompute-attention 0 1 2
set -u
SQUAD=${SQUAD:-../shared/data/squad/dev-v1.1.json}
OUT=${OUT:-wtacrs-output/squad-backward-draws}
recipe=$1; shift
mkdir -p "$OUT/logs"
for seed in "$@"; do
  if ls "$OUT"/squad/*/"$recipe/seed$seed/results.json" >/dev/null 2>&1; then echo "skip $recipe seed$seed"; continue; fi
  echo "$(date -u +%FT%TZ) start $recipe seed$seed"
  wtacrs finetune --task squad --data-dir "$SQUAD" --max-train-samples 1500 --max-length 192 --doc-stride 64 \
    --epochs 2 --batch-size 16 --method "$recipe" --lr 1e-4 --seed "$seed" \
    --output-dir "$OUT" --no-progress --overwrite > "$OUT/logs/$recipe-seed$seed.log" 2>&1
  echo "$(date -u +%FT%TZ) done $recipe seed$seed (exit $?)"
  rm -rf "$OUT"/squad/*/"$recipe/seed$seed"/checkpoint-*
done
